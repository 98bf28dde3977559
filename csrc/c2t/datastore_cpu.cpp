// c2t_fast::datastore_lookup: the continuations of the longest suffix of a context in a suffix-sorted token
// corpus (REST's datastore), CPU.
//
// Why C++: a lookup is ~10 binary searches over millions of positions and a trie of a few hundred nodes.
// numpy pays a call's overhead per probe and needs a materialised copy of every position's key (24 bytes a
// position: 100 MB for a 4M-token corpus) to search; here the searches read the corpus itself through the
// sorted positions, and the whole lookup is a few microseconds, far below the 2% of a decoding step it may
// cost.
//
// The index (``order``) is what decoding.drafts.datastore builds with numpy: positions sorted by the bytes of
// their first key_len tokens, uint16 little-endian, the corpus padded with SEP (0xFFFF) past its end. Byte
// order matters: comparing the little-endian bytes of two tokens is comparing their byte-swapped values, so
// every comparison here is on swapped tokens. Any query (no SEP in it) of m <= key_len tokens then matches a
// contiguous range of ``order``, found by two binary searches on the first m tokens.
//
// The answer is the same as the Python reference's (kernels/reference.py) bit for bit: the longest matching
// suffix (bisected over its length: a suffix that occurs has every shorter suffix occurring too), up to
// max_occurrences occurrences spread evenly over the range, their next ``depth`` tokens (cut at SEP) merged
// into a trie in row order, the max_nodes nodes of largest count kept (ties: shallower, then created
// earlier; a parent always ranks before its child, so the kept set is closed under parents), written
// parents-first (by depth, then count descending, then creation).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace c2t_fast {
namespace {

constexpr uint16_t kSep = 0xFFFF;
constexpr int64_t kMaxKeyLen = 32;
constexpr int64_t kMaxDepth = 64;
constexpr int64_t kMaxNodes = 1024;
constexpr int64_t kMaxOccurrences = 4096;

inline uint32_t swapped(uint16_t t) { return static_cast<uint32_t>(((t & 0xFF) << 8) | (t >> 8)); }

struct Corpus {
  const uint16_t* tok;
  const int32_t* order;
  int64_t n;

  int64_t position(int64_t i) const {
    const int64_t p = order[i];
    TORCH_CHECK_VALUE(p >= 0 && p < n, "datastore_lookup: order[", i, "] = ", p, " is not a position of the ",
                      n, "-token corpus");
    return p;
  }
  uint16_t at(int64_t p) const { return p < n ? tok[p] : kSep; }

  // -1 / 0 / 1: the first m tokens at sorted index i against q[0..m), in the index's byte order.
  int compare(int64_t i, const uint16_t* q, int64_t m) const {
    const int64_t p = position(i);
    for (int64_t j = 0; j < m; ++j) {
      const uint32_t a = swapped(at(p + j)), b = swapped(q[j]);
      if (a != b) return a < b ? -1 : 1;
    }
    return 0;
  }

  // [lo, hi) of the sorted positions whose text starts with q[0..m). Each probe is two cache misses (the
  // position, then its text), so probes are spared: an empty range ends after the first search (half of
  // the bisection's lengths find nothing), and the range's end is galloped to from its start (most
  // suffixes occur a few times) instead of searched for over the whole corpus.
  std::pair<int64_t, int64_t> range(const uint16_t* q, int64_t m) const {
    int64_t lo = 0, hi = n;
    while (lo < hi) {  // first index not below q
      const int64_t mid = lo + (hi - lo) / 2;
      if (compare(mid, q, m) < 0) lo = mid + 1; else hi = mid;
    }
    const int64_t a = lo;
    if (a == n || compare(a, q, m) != 0) return {a, a};
    int64_t inside = a, outside = n;  // the last index known to match, the first known not to
    for (int64_t step = 1; inside + step < n; step *= 2) {
      if (compare(inside + step, q, m) != 0) {
        outside = inside + step;
        break;
      }
      inside += step;
    }
    lo = inside + 1, hi = outside;
    while (lo < hi) {  // first index above q, between the two
      const int64_t mid = lo + (hi - lo) / 2;
      if (compare(mid, q, m) == 0) lo = mid + 1; else hi = mid;
    }
    return {a, lo};
  }
};

struct Node {
  int64_t parent, token, count, depth, first_child, next_sibling;
};

}  // namespace

// One int64 tensor [3 + 3 * max_nodes]: (match, occurrences, nodes), then the nodes' tokens, parents and
// counts (-1 / -1 / 0 past the tree). One output and a list context: a lookup runs every decoding step, and
// on a small CPU allocating and wrapping four tensors cost more than the search itself.
at::Tensor datastore_lookup_cpu(const at::Tensor& tokens, const at::Tensor& order, c10::IntArrayRef context,
                                int64_t key_len, int64_t depth, int64_t max_nodes, int64_t min_match,
                                int64_t max_occurrences) {
  const char* op = "datastore_lookup";
  TORCH_CHECK_VALUE(tokens.device().is_cpu() && order.device().is_cpu(), op,
                    ": tokens and order must be CPU tensors");
  TORCH_CHECK_VALUE(tokens.scalar_type() == at::kUInt16 && tokens.dim() == 1 && tokens.is_contiguous(), op,
                    ": tokens must be a contiguous uint16 vector, got ", tokens.scalar_type(), " ", tokens.sizes());
  TORCH_CHECK_VALUE(order.scalar_type() == at::kInt && order.dim() == 1 && order.is_contiguous(), op,
                    ": order must be a contiguous int32 vector, got ", order.scalar_type(), " ", order.sizes());
  TORCH_CHECK_VALUE(order.numel() == tokens.numel(), op, ": order must hold one position per token (",
                    tokens.numel(), "), got ", order.numel());
  TORCH_CHECK_VALUE(key_len >= 2 && key_len <= kMaxKeyLen, op, ": key_len must be in 2..", kMaxKeyLen, ", got ",
                    key_len);
  TORCH_CHECK_VALUE(depth >= 1 && depth <= kMaxDepth, op, ": depth must be in 1..", kMaxDepth, ", got ", depth);
  TORCH_CHECK_VALUE(max_nodes >= 1 && max_nodes <= kMaxNodes, op, ": max_nodes must be in 1..", kMaxNodes,
                    ", got ", max_nodes);
  TORCH_CHECK_VALUE(min_match >= 1 && min_match <= key_len, op, ": min_match must be in 1..key_len (", key_len,
                    "), got ", min_match);
  TORCH_CHECK_VALUE(max_occurrences >= 1 && max_occurrences <= kMaxOccurrences, op,
                    ": max_occurrences must be in 1..", kMaxOccurrences, ", got ", max_occurrences);
  TORCH_CHECK_VALUE(tokens.numel() < (int64_t{1} << 31), op, ": corpora of 2^31 tokens or more are not supported");

  at::Tensor out = at::empty({3 + 3 * max_nodes}, at::TensorOptions().dtype(at::kLong));
  int64_t* inf = out.data_ptr<int64_t>();
  int64_t* ot = inf + 3;
  int64_t* op_ = ot + max_nodes;
  int64_t* oc = op_ + max_nodes;
  std::fill(inf, inf + 3, 0);
  std::fill(ot, oc, -1);
  std::fill(oc, oc + max_nodes, 0);

  const int64_t n_ctx = static_cast<int64_t>(context.size());
  const int64_t c = std::min<int64_t>(n_ctx, key_len);
  const int64_t* tail = context.data() + (n_ctx - c);
  uint16_t q[kMaxKeyLen];
  for (int64_t j = 0; j < c; ++j)
    TORCH_CHECK_VALUE(tail[j] >= 0, op, ": context holds a negative token id (", tail[j], ")");
  for (int64_t j = 0; j < c; ++j) {
    if (tail[j] >= kSep) return out;  // no uint16 corpus holds it
    q[j] = static_cast<uint16_t>(tail[j]);
  }
  if (c < min_match || tokens.numel() == 0) return out;

  const Corpus corpus{tokens.data_ptr<uint16_t>(), order.data_ptr<int32_t>(), tokens.numel()};
  int64_t best = 0, a = 0, b = 0, lo_m = min_match, hi_m = c;
  while (lo_m <= hi_m) {
    const int64_t m = (lo_m + hi_m) / 2;
    const auto r = corpus.range(q + (c - m), m);
    if (r.second > r.first) {
      best = m, a = r.first, b = r.second, lo_m = m + 1;
    } else {
      hi_m = m - 1;
    }
  }
  if (best == 0) return out;
  const int64_t occ = b - a, rows = std::min(occ, max_occurrences);

  std::vector<Node> nodes;
  nodes.reserve(static_cast<size_t>(rows * depth));
  int64_t root_first = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t idx = occ <= max_occurrences ? a + r : a + (r * occ) / max_occurrences;
    const int64_t start = corpus.position(idx) + best;
    int64_t at_node = -1;
    for (int64_t d = 0; d < depth; ++d) {
      const uint16_t t = corpus.at(start + d);
      if (t == kSep) break;
      int64_t* link = at_node < 0 ? &root_first : &nodes[at_node].first_child;
      int64_t child = *link, last = -1;
      while (child >= 0 && nodes[child].token != t) last = child, child = nodes[child].next_sibling;
      if (child < 0) {
        child = static_cast<int64_t>(nodes.size());
        nodes.push_back({at_node, t, 0, at_node < 0 ? 1 : nodes[at_node].depth + 1, -1, -1});
        if (last < 0) *(at_node < 0 ? &root_first : &nodes[at_node].first_child) = child;
        else nodes[last].next_sibling = child;
      }
      nodes[child].count += 1;
      at_node = child;
    }
  }
  if (nodes.empty()) return out;

  std::vector<int64_t> chosen(nodes.size());
  for (size_t i = 0; i < nodes.size(); ++i) chosen[i] = static_cast<int64_t>(i);
  const int64_t keep = std::min<int64_t>(max_nodes, static_cast<int64_t>(nodes.size()));
  std::partial_sort(chosen.begin(), chosen.begin() + keep, chosen.end(), [&](int64_t x, int64_t y) {
    const Node &u = nodes[x], &v = nodes[y];
    if (u.count != v.count) return u.count > v.count;
    if (u.depth != v.depth) return u.depth < v.depth;
    return x < y;
  });
  chosen.resize(static_cast<size_t>(keep));
  std::sort(chosen.begin(), chosen.end(), [&](int64_t x, int64_t y) {
    const Node &u = nodes[x], &v = nodes[y];
    if (u.depth != v.depth) return u.depth < v.depth;
    if (u.count != v.count) return u.count > v.count;
    return x < y;
  });
  std::vector<int64_t> where(nodes.size(), -1);
  for (int64_t j = 0; j < keep; ++j) where[chosen[j]] = j;
  for (int64_t j = 0; j < keep; ++j) {
    const Node& u = nodes[chosen[j]];
    const int64_t p = u.parent < 0 ? -1 : where[u.parent];
    TORCH_INTERNAL_ASSERT(u.parent < 0 || (p >= 0 && p < j),
                          "datastore_lookup: a kept node's parent was not kept first");
    ot[j] = u.token, op_[j] = p, oc[j] = u.count;
  }
  inf[0] = best, inf[1] = occ, inf[2] = keep;
  return out;
}

TORCH_LIBRARY_IMPL(c2t_fast, CPU, m) { m.impl("datastore_lookup", &datastore_lookup_cpu); }

}  // namespace c2t_fast
