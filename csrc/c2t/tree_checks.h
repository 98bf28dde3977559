// Device-agnostic argument checks shared by the CPU and CUDA bindings of the tree ops.
// Every check runs before anything is allocated or written, so a bad call changes nothing.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace c2t_fast {

inline void check_vec(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                    t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ",
                    name_b, " is on ", b.device(), "; all inputs must be on one device");
}

// Positions are prefix_len + depth (depth < T): both must fit in int64.
inline void check_prefix_len(int64_t prefix_len, int64_t T, const char* op) {
  TORCH_CHECK_VALUE(prefix_len >= 0, op, ": prefix_len must be >= 0, got ", prefix_len);
  TORCH_CHECK_VALUE(prefix_len <= std::numeric_limits<int64_t>::max() - T, op, ": prefix_len ", prefix_len,
                    " is too large: positions prefix_len + depth (T = ", T, " nodes) would overflow int64");
}

inline void check_tree_args(const at::Tensor& tokens, const at::Tensor& parents, const char* op) {
  check_vec(tokens, op, "tokens", at::kLong);
  check_vec(parents, op, "parents", at::kInt);
  TORCH_CHECK_VALUE(tokens.numel() == parents.numel(), op, ": tokens has ", tokens.numel(),
                    " nodes but parents has ", parents.numel());
  TORCH_CHECK_VALUE(parents.numel() >= 1, op, ": parents is empty; the tree needs at least the root node");
  check_same_device(tokens, parents, op, "tokens", "parents");
}

inline void check_rows(const at::Tensor& x, int64_t T, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == T, op, ": ", name, " must be [T, V] with T = ", T,
                    " tree nodes, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": ", name, " has an empty vocabulary dimension");
}

// prune_tree: shapes, dtypes and devices of the tree and candidate arrays (contents are checked by
// the kernels, which read them).
inline void check_prune_args(const at::Tensor& tree_tokens, const at::Tensor& tree_parents,
                             const at::Tensor& tree_logp, const at::Tensor& cand_parent,
                             const at::Tensor& cand_token, const at::Tensor& cand_logp,
                             const at::Tensor& cand_conf, const at::Tensor& cand_keep) {
  const char* op = "prune_tree";
  check_tree_args(tree_tokens, tree_parents, op);
  check_vec(tree_logp, op, "tree_logp", at::kFloat);
  TORCH_CHECK_VALUE(tree_logp.numel() == tree_tokens.numel(), op, ": tree_logp has ", tree_logp.numel(),
                    " entries for ", tree_tokens.numel(), " nodes");
  check_vec(cand_parent, op, "cand_parent", at::kLong);
  check_vec(cand_token, op, "cand_token", at::kLong);
  check_vec(cand_logp, op, "cand_logp", at::kFloat);
  check_vec(cand_conf, op, "cand_conf", at::kFloat);
  check_vec(cand_keep, op, "cand_keep", at::kBool);
  const int64_t N = cand_parent.numel();
  for (const at::Tensor* t : {&cand_token, &cand_logp, &cand_conf, &cand_keep}) {
    TORCH_CHECK_VALUE(t->numel() == N, op, ": all candidate arrays need ", N,
                      " entries (as cand_parent), got one with ", t->numel());
  }
  for (const at::Tensor* t : {&tree_logp, &cand_parent, &cand_token, &cand_logp, &cand_conf, &cand_keep}) {
    check_same_device(*t, tree_tokens, op, "a candidate or tree array", "tree_tokens");
  }
}

inline void check_rerank_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logp,
                              int64_t total_tokens) {
  const char* op = "rerank_tree";
  check_tree_args(tokens, parents, op);
  check_vec(logp, op, "logp", at::kFloat);
  check_same_device(tokens, logp, op, "tokens", "logp");
  TORCH_CHECK_VALUE(logp.numel() == tokens.numel(), op, ": logp has ", logp.numel(), " entries for ",
                    tokens.numel(), " nodes");
  TORCH_CHECK_VALUE(total_tokens >= 1, op, ": total_tokens counts the root and must be >= 1, got ",
                    total_tokens);
}

// verify_greedy's target: int64 argmax ids [T] or floating logits [T, V].
inline void check_greedy_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target) {
  const char* op = "verify_greedy";
  check_tree_args(tokens, parents, op);
  check_same_device(tokens, target, op, "tokens", "target");
  const int64_t T = tokens.numel();
  if (target.scalar_type() == at::kLong) {
    check_vec(target, op, "target (argmax ids)", at::kLong);
    TORCH_CHECK_VALUE(target.numel() == T, op, ": target argmax has ", target.numel(), " entries for ", T,
                      " nodes");
  } else {
    TORCH_CHECK_VALUE(at::isFloatingType(target.scalar_type()), op,
                      ": target must be int64 argmax ids [T] or floating logits [T, V], got ",
                      target.scalar_type());
    check_rows(target, T, op, "target logits");
  }
}

inline void check_sample_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& probs,
                              const at::Tensor& uniforms) {
  const char* op = "verify_sample";
  check_tree_args(tokens, parents, op);
  const int64_t T = tokens.numel();
  TORCH_CHECK_VALUE(at::isFloatingType(probs.scalar_type()), op, ": probs must be floating point, got ",
                    probs.scalar_type());
  check_rows(probs, T, op, "probs");
  check_vec(uniforms, op, "uniforms", at::kDouble);
  TORCH_CHECK_VALUE(uniforms.numel() == T, op, ": uniforms needs one draw per node (", T,
                    "; slot 0 draws the bonus token), got ", uniforms.numel());
  check_same_device(tokens, probs, op, "tokens", "probs");
  check_same_device(tokens, uniforms, op, "tokens", "uniforms");
}

// verify_sample's contents: a uniform outside [0, 1) (or NaN) and a probability row that is not a
// finite, non-negative measure with positive mass would each give a verdict that is not lossless.
[[noreturn]] inline void fail_bad_uniform(const char* op, int64_t i, double value) {
  TORCH_CHECK_VALUE(false, op, ": uniforms[", i, "] = ", value, " is outside [0, 1)");
  __builtin_unreachable();
}

[[noreturn]] inline void fail_bad_probs_row(const char* op, int64_t i) {
  TORCH_CHECK_VALUE(false, op, ": probs[", i, "] is not a probability row (every entry must be finite and >= 0, "
                    "and the row must have positive mass)");
  __builtin_unreachable();
}

// The error for the first invalid entry of a parents array (shared so CPU and CUDA say the same).
[[noreturn]] inline void fail_bad_parent(const char* op, int64_t i, int64_t value) {
  if (i == 0) {
    TORCH_CHECK_VALUE(false, op, ": node 0 must be the root (parents[0] == -1), got parents[0] = ",
                      value);
  }
  TORCH_CHECK_VALUE(false, op, ": parents[", i, "] = ", value,
                    " is invalid; every non-root node needs a parent with a smaller index "
                    "(topological order, root at node 0, no cycles)");
  __builtin_unreachable();
}

// compact_kv moves rows in place, so no two caches (and no two rows of one cache) may share memory:
// the same tensor passed twice, or an expanded (stride-0) view, would be compacted more than once.
// Metadata only (addresses and strides, never the data), so it serves the CUDA binding too.
namespace detail {
struct RowSpan {
  uintptr_t lo, hi;  // byte range [lo, hi) of a tensor's elements (torch strides are never negative)
  size_t idx;
};

// Byte ranges of every row ([B, H, S] positions, D contiguous elements each) of a cache.
inline std::vector<std::pair<uintptr_t, uintptr_t>> cache_rows(const at::Tensor& c) {
  std::vector<std::pair<uintptr_t, uintptr_t>> rows;
  const uintptr_t base = reinterpret_cast<uintptr_t>(c.data_ptr());
  const int64_t es = c.element_size(), row = c.size(3) * es;
  rows.reserve(c.size(0) * c.size(1) * c.size(2));
  for (int64_t b = 0; b < c.size(0); ++b)
    for (int64_t h = 0; h < c.size(1); ++h)
      for (int64_t s = 0; s < c.size(2); ++s) {
        const uintptr_t lo = base + (b * c.stride(0) + h * c.stride(1) + s * c.stride(2)) * es;
        rows.emplace_back(lo, lo + row);
      }
  std::sort(rows.begin(), rows.end());
  return rows;
}

inline bool rows_overlap(const std::vector<std::pair<uintptr_t, uintptr_t>>& a,
                         const std::vector<std::pair<uintptr_t, uintptr_t>>& b) {
  size_t i = 0, j = 0;  // both sorted by start: a merge walk
  while (i < a.size() && j < b.size()) {
    if (a[i].first < b[j].second && b[j].first < a[i].second) return true;
    if (a[i].second <= b[j].second) ++i; else ++j;
  }
  return false;
}

inline bool has_self_overlap(const std::vector<std::pair<uintptr_t, uintptr_t>>& rows) {
  for (size_t i = 1; i < rows.size(); ++i)
    if (rows[i].first < rows[i - 1].second) return true;
  return false;
}
}  // namespace detail

// Enumerating rows is exact but costs B*H*S per tensor; it only runs for a tensor whose layout is not
// obviously row-disjoint, or for two tensors whose byte extents intersect (never for a DynamicCache).
constexpr int64_t kMaxRowsToCompare = int64_t(1) << 22;

inline void check_caches_disjoint(at::TensorList caches, const char* op) {
  std::vector<detail::RowSpan> spans;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    if (c.numel() == 0) continue;
    for (int64_t d = 0; d < 3; ++d) {
      TORCH_CHECK_VALUE(c.size(d) == 1 || c.stride(d) != 0, op, ": caches[", i,
                        "] is an expanded view (stride 0 in dimension ", d,
                        "): its rows share memory and cannot be compacted in place");
    }
    // Row-disjoint for sure when the [B, H, S] strides, sorted, each step over everything below.
    std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
    for (int64_t d = 0; d < 3; ++d)
      if (c.size(d) > 1) dims.emplace_back(c.stride(d), c.size(d));
    std::sort(dims.begin(), dims.end());
    int64_t extent = c.size(3), last = c.size(3) - 1;
    bool nested = true;
    for (const auto& [stride, size] : dims) {
      nested = nested && stride >= extent;
      extent = std::max(extent, stride * (size - 1) + extent);
      last += stride * (size - 1);
    }
    if (!nested) {
      TORCH_CHECK_VALUE(c.numel() / c.size(3) <= kMaxRowsToCompare, op, ": caches[", i,
                        "] has an unusual layout (strides ", c.strides(), ") too large to prove free of overlap");
      TORCH_CHECK_VALUE(!detail::has_self_overlap(detail::cache_rows(c)), op, ": caches[", i,
                        "] has rows that share memory (strides ", c.strides(),
                        "); they cannot be compacted in place");
    }
    const uintptr_t lo = reinterpret_cast<uintptr_t>(c.data_ptr());
    spans.push_back({lo, lo + static_cast<uintptr_t>((last + 1) * c.element_size()), i});
  }
  std::sort(spans.begin(), spans.end(), [](const auto& a, const auto& b) { return a.lo < b.lo; });
  std::vector<size_t> active;  // spans whose extent reaches past the current start
  for (size_t k = 0; k < spans.size(); ++k) {
    const detail::RowSpan& cur = spans[k];
    active.erase(std::remove_if(active.begin(), active.end(), [&](size_t a) { return spans[a].hi <= cur.lo; }),
                 active.end());
    for (size_t a : active) {
      const at::Tensor& x = caches[spans[a].idx];
      const at::Tensor& y = caches[cur.idx];
      const size_t i = std::min(spans[a].idx, cur.idx), j = std::max(spans[a].idx, cur.idx);
      TORCH_CHECK_VALUE(x.data_ptr() != y.data_ptr(), op, ": caches[", i, "] and caches[", j,
                        "] are the same memory; each cache must be passed once");
      TORCH_CHECK_VALUE(x.numel() / x.size(3) <= kMaxRowsToCompare, op, ": caches[", i, "] and caches[", j,
                        "] interleave in memory and are too large to prove disjoint");
      TORCH_CHECK_VALUE(!detail::rows_overlap(detail::cache_rows(x), detail::cache_rows(y)), op, ": caches[", i,
                        "] and caches[", j, "] share memory; each cache must be a separate tensor");
    }
    active.push_back(k);
  }
}

}  // namespace c2t_fast
