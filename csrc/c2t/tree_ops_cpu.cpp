// CPU kernels of the token-tree ops. All loops are O(T * words) or O(T log T); trees are small
// (T <= a few thousand), so the cost is dominated by dispatch, which is why these run serially
// except compact_kv, which moves real cache bytes and is parallel over (layer, batch, head).
#include "tree_ops.h"
#include "tree_checks.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace c2t_fast {

void check_parents(const at::Tensor& parents, const char* op) {
  const int32_t* p = parents.data_ptr<int32_t>();
  const int64_t T = parents.numel();
  TORCH_CHECK_VALUE(T >= 1, op, ": parents is empty; the tree needs at least the root node");
  if (p[0] != -1) fail_bad_parent(op, 0, p[0]);
  for (int64_t i = 1; i < T; ++i) {
    if (p[i] < 0 || p[i] >= i) fail_bad_parent(op, i, p[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree_cpu(
    const at::Tensor& parents_in, int64_t prefix_len) {
  const char* op = "build_tree";
  check_vec(parents_in, op, "parents", at::kInt);
  check_prefix_len(prefix_len, parents_in.numel(), op);
  const at::Tensor parents = parents_in.contiguous();
  check_parents(parents, op);
  const int32_t* p = parents.data_ptr<int32_t>();
  const int64_t T = parents.numel();
  const int64_t W = (T + 63) / 64;

  auto i32 = parents.options();
  auto i64 = parents.options().dtype(at::kLong);
  at::Tensor depth = at::empty({T}, i32);
  at::Tensor bits = at::zeros({T, W}, i64);
  at::Tensor pos = at::empty({T}, i64);
  int32_t* d = depth.data_ptr<int32_t>();
  uint64_t* b = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  int64_t* ps = pos.data_ptr<int64_t>();
  std::vector<uint8_t> has_child(T, 0);
  int32_t max_depth = 0;
  for (int64_t i = 0; i < T; ++i) {
    if (i > 0) {
      const int32_t par = p[i];
      d[i] = d[par] + 1;
      std::memcpy(b + i * W, b + par * W, W * sizeof(uint64_t));
      has_child[par] = 1;
    } else {
      d[i] = 0;
    }
    b[i * W + i / 64] |= uint64_t(1) << (i % 64);
    ps[i] = prefix_len + d[i];
    max_depth = std::max(max_depth, d[i]);
  }
  int64_t L = 0;
  for (int64_t i = 0; i < T; ++i) L += has_child[i] ? 0 : 1;
  at::Tensor leaves = at::empty({L}, i64);
  at::Tensor retrieve = at::full({L, max_depth + 1}, -1, i64);
  int64_t* lv = leaves.data_ptr<int64_t>();
  int64_t* r = retrieve.data_ptr<int64_t>();
  for (int64_t i = 0, l = 0; i < T; ++i) {
    if (has_child[i]) continue;
    lv[l] = i;
    for (int64_t j = i; j != -1; j = p[j]) r[l * (max_depth + 1) + d[j]] = j;
    ++l;
  }
  return {depth, bits, pos, retrieve, leaves};
}

namespace {

// Orders candidates by (confidence desc, index asc); NaN confidences sort last.
struct ByConfidence {
  const float* c;
  bool operator()(int64_t a, int64_t b) const {
    const float ca = std::isnan(c[a]) ? -INFINITY : c[a];
    const float cb = std::isnan(c[b]) ? -INFINITY : c[b];
    return ca > cb || (ca == cb && a < b);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_tree_cpu(
    const at::Tensor& tree_tokens, const at::Tensor& tree_parents, const at::Tensor& tree_logp,
    const at::Tensor& cand_parent, const at::Tensor& cand_token, const at::Tensor& cand_logp,
    const at::Tensor& cand_conf, const at::Tensor& cand_keep, int64_t max_keep) {
  const char* op = "prune_tree";
  check_prune_args(tree_tokens, tree_parents, tree_logp, cand_parent, cand_token, cand_logp, cand_conf,
                   cand_keep);
  const int64_t N = cand_parent.numel();
  const int64_t T = tree_tokens.numel();
  const at::Tensor cp_c = cand_parent.contiguous();  // keep the (possibly new) buffer alive
  const int64_t* cp = cp_c.data_ptr<int64_t>();
  at::Tensor conf_c = cand_conf.contiguous();
  at::Tensor keep_c = cand_keep.contiguous();
  const float* conf = conf_c.data_ptr<float>();
  const bool* keep = keep_c.data_ptr<bool>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(cp[i] >= 0 && cp[i] < T, op, ": cand_parent[", i, "] = ", cp[i],
                      " is not a node of the ", T, "-node tree");
  }
  check_parents(tree_parents.contiguous(), op);

  std::vector<int64_t> sel;
  sel.reserve(N);
  for (int64_t i = 0; i < N; ++i)
    if (keep[i]) sel.push_back(i);
  if (max_keep >= 0 && static_cast<int64_t>(sel.size()) > max_keep) {
    std::partial_sort(sel.begin(), sel.begin() + max_keep, sel.end(), ByConfidence{conf});
    sel.resize(max_keep);
    std::sort(sel.begin(), sel.end());
  }
  // Outputs are written directly: at this size a handful of cat/index_select calls would cost more
  // than the selection itself.
  const int64_t n = static_cast<int64_t>(sel.size());
  at::Tensor selected = at::empty({n}, cand_parent.options());
  at::Tensor frontier = at::empty({n}, cand_parent.options());
  at::Tensor tokens = at::empty({T + n}, tree_tokens.options());
  at::Tensor parents = at::empty({T + n}, tree_parents.options());
  at::Tensor logp = at::empty({T + n}, tree_logp.options());
  const at::Tensor tt = tree_tokens.contiguous(), tp = tree_parents.contiguous(), tl = tree_logp.contiguous();
  const at::Tensor ct = cand_token.contiguous(), cl = cand_logp.contiguous();
  int64_t* o_tok = tokens.data_ptr<int64_t>();
  int32_t* o_par = parents.data_ptr<int32_t>();
  float* o_lp = logp.data_ptr<float>();
  std::memcpy(o_tok, tt.data_ptr<int64_t>(), T * sizeof(int64_t));
  std::memcpy(o_par, tp.data_ptr<int32_t>(), T * sizeof(int32_t));
  std::memcpy(o_lp, tl.data_ptr<float>(), T * sizeof(float));
  const int64_t* c_tok = ct.data_ptr<int64_t>();
  const float* c_lp = cl.data_ptr<float>();
  int64_t* o_sel = selected.data_ptr<int64_t>();
  int64_t* o_fr = frontier.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t c = sel[k];
    o_sel[k] = c;
    o_fr[k] = T + k;
    o_tok[T + k] = c_tok[c];
    o_par[T + k] = static_cast<int32_t>(cp[c]);
    o_lp[T + k] = c_lp[c];
  }
  return {tokens, parents, logp, frontier, selected};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rerank_tree_cpu(
    const at::Tensor& tokens, const at::Tensor& parents_in, const at::Tensor& logp_in,
    int64_t total_tokens) {
  const char* op = "rerank_tree";
  check_rerank_args(tokens, parents_in, logp_in, total_tokens);
  const at::Tensor parents = parents_in.contiguous();
  check_parents(parents, op);
  const at::Tensor logp_c = logp_in.contiguous();
  const int32_t* p = parents.data_ptr<int32_t>();
  const float* lp = logp_c.data_ptr<float>();
  const int64_t T = tokens.numel();

  std::vector<int64_t> order(T - 1);
  std::iota(order.begin(), order.end(), 1);
  std::stable_sort(order.begin(), order.end(), [lp](int64_t a, int64_t b) {
    const float la = std::isnan(lp[a]) ? -INFINITY : lp[a];
    const float lb = std::isnan(lp[b]) ? -INFINITY : lp[b];
    return la > lb;
  });
  // Greedy top-N that stays closed under parents: a node enters together with any ancestors not yet
  // chosen, or not at all. With monotone joint log-probs this is exactly EAGLE-2's top-N.
  std::vector<uint8_t> chosen(T, 0);
  chosen[0] = 1;
  int64_t count = 1;
  for (int64_t idx : order) {
    if (count >= total_tokens) break;
    if (chosen[idx]) continue;
    int64_t missing = 0;
    for (int64_t j = idx; j != -1 && !chosen[j]; j = p[j]) ++missing;
    if (count + missing > total_tokens) continue;
    for (int64_t j = idx; j != -1 && !chosen[j]; j = p[j]) chosen[j] = 1;
    count += missing;
  }
  at::Tensor selected = at::empty({count}, tokens.options());
  at::Tensor new_parents = at::empty({count}, parents.options());
  int64_t* s = selected.data_ptr<int64_t>();
  int32_t* np = new_parents.data_ptr<int32_t>();
  std::vector<int32_t> renum(T, -1);
  for (int64_t i = 0, k = 0; i < T; ++i) {
    if (!chosen[i]) continue;
    renum[i] = static_cast<int32_t>(k);
    s[k] = i;
    np[k] = i == 0 ? -1 : renum[p[i]];
    ++k;
  }
  return {tokens.index_select(0, selected), new_parents, logp_in.index_select(0, selected),
          selected};
}

namespace {

template <typename scalar_t>
void argmax_rows(const at::Tensor& logits, int64_t* out) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  for (int64_t i = 0; i < T; ++i) {
    const scalar_t* row = x + i * V;
    int64_t best = 0;
    // Compared in the logits' own precision (double for fp64: fp32 would merge values 1e-12 apart).
    using acc_t = at::opmath_type<scalar_t>;
    acc_t bv = static_cast<acc_t>(row[0]);
    for (int64_t v = 1; v < V; ++v) {
      const acc_t xv = static_cast<acc_t>(row[v]);
      // Same convention as torch.argmax: first maximum wins, NaN counts as the maximum.
      if (!std::isnan(bv) && (xv > bv || std::isnan(xv))) {
        bv = xv;
        best = v;
      }
    }
    out[i] = best;
  }
}

std::vector<int64_t> path_to(const int32_t* p, const int32_t* depth, int64_t node) {
  std::vector<int64_t> path(depth[node] + 1);
  for (int64_t j = node; j != -1; j = p[j]) path[depth[j]] = j;
  return path;
}

at::Tensor to_tensor(const std::vector<int64_t>& v, const at::TensorOptions& opt) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, opt);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& tokens_in,
                                                     const at::Tensor& parents_in,
                                                     const at::Tensor& target) {
  const char* op = "verify_greedy";
  check_greedy_args(tokens_in, parents_in, target);
  const int64_t T = tokens_in.numel();
  at::Tensor pred;
  if (target.scalar_type() == at::kLong) {
    pred = target.contiguous();
  } else {
    pred = at::empty({T}, tokens_in.options());
    const at::Tensor logits = target.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "argmax_rows",
                                    [&] { argmax_rows<scalar_t>(logits, pred.data_ptr<int64_t>()); });
  }
  const at::Tensor parents = parents_in.contiguous();
  check_parents(parents, op);
  const at::Tensor tokens = tokens_in.contiguous();
  const int32_t* p = parents.data_ptr<int32_t>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* pr = pred.data_ptr<int64_t>();
  std::vector<uint8_t> acc(T, 0);
  std::vector<int32_t> depth(T, 0);
  acc[0] = 1;
  int64_t best = 0;
  for (int64_t i = 1; i < T; ++i) {
    depth[i] = depth[p[i]] + 1;
    acc[i] = acc[p[i]] && tok[i] == pr[p[i]];
    if (acc[i] && depth[i] > depth[best]) best = i;
  }
  at::Tensor path = to_tensor(path_to(p, depth.data(), best), tokens.options());
  return {path, at::scalar_tensor(pr[best], tokens.options())};
}

namespace {

// Sum of row[lo, hi) in double with 8 independent accumulators (the adds pipeline and vectorise), and
// the smallest entry into `lowest` (a negative probability; NaN and inf show in the sum instead).
template <typename scalar_t>
double range_sum(const scalar_t* row, int64_t lo, int64_t hi, double& lowest) {
  double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t v = lo;
  for (; v + 8 <= hi; v += 8)
    for (int k = 0; k < 8; ++k) {
      const double x = static_cast<double>(row[v + k]);
      a[k] += x;
      m[k] = x < m[k] ? x : m[k];
    }
  for (; v < hi; ++v) {
    const double x = static_cast<double>(row[v]);
    a[0] += x;
    m[0] = x < m[0] ? x : m[0];
  }
  for (int k = 0; k < 8; ++k) lowest = m[k] < lowest ? m[k] : lowest;
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

bool contains(const std::vector<int64_t>& xs, int64_t x) {
  return std::find(xs.begin(), xs.end(), x) != xs.end();
}

constexpr int64_t kCdfBlock = 1024;

// Row mass as the sum of its kCdfBlock-sized block sums, which the inverse CDF reuses.
template <typename scalar_t>
double row_mass(const scalar_t* row, int64_t V, std::vector<double>& blocks) {
  blocks.clear();
  double total = 0.0, lowest = 0.0;
  for (int64_t lo = 0; lo < V; lo += kCdfBlock) {
    blocks.push_back(range_sum(row, lo, std::min(V, lo + kCdfBlock), lowest));
    total += blocks.back();
  }
  // A row the walk reads must be a measure (finite, >= 0, positive mass): anything else gives a verdict
  // that is not lossless. Rows the walk never reads cannot change the verdict and are not scanned.
  return std::isfinite(total) && total > 0.0 && lowest >= 0.0 ? total : -1.0;
}

// Inverse CDF of `row` with the `rejected` tokens removed, at `target` (= u * residual mass).
// Blocks are skipped by their sums; only the block holding the target is scanned.
template <typename scalar_t>
int64_t residual_inverse_cdf(const scalar_t* row, int64_t V, const std::vector<double>& blocks,
                             const std::vector<int64_t>& rejected, double target) {
  double acc = 0.0;
  int64_t last_pos = -1;
  for (int64_t lo = 0, b = 0; lo < V; lo += kCdfBlock, ++b) {
    const int64_t hi = std::min(V, lo + kCdfBlock);
    double block = blocks[b];
    for (int64_t r : rejected)
      if (r >= lo && r < hi) block -= static_cast<double>(row[r]);
    if (acc + block <= target) {
      acc += block;
      for (int64_t v = hi - 1; v >= lo && block > 0.0; --v) {
        if (static_cast<double>(row[v]) > 0.0 && !contains(rejected, v)) {
          last_pos = v;
          break;
        }
      }
      continue;
    }
    for (int64_t v = lo; v < hi; ++v) {
      const double pv = static_cast<double>(row[v]);
      if (pv <= 0.0 || contains(rejected, v)) continue;
      last_pos = v;
      acc += pv;
      if (acc > target) return v;
    }
  }
  // Rounding left the target just past the residual's mass (or the residual is empty).
  return last_pos >= 0 ? last_pos : 0;
}

template <typename scalar_t>
std::tuple<std::vector<int64_t>, int64_t> sample_walk(const int32_t* p, const int64_t* tok,
                                                      const scalar_t* probs, int64_t T, int64_t V,
                                                      const double* u) {
  // Children in index order (CSR): sibling order is the order candidates are tried in.
  std::vector<int64_t> start(T + 1, 0), kids(std::max<int64_t>(T - 1, 0));
  for (int64_t i = 1; i < T; ++i) ++start[p[i] + 1];
  for (int64_t i = 0; i < T; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 1; i < T; ++i) kids[fill[p[i]]++] = i;

  std::vector<int64_t> path{0};
  std::vector<int64_t> rejected;
  std::vector<double> blocks;
  int64_t cur = 0;
  double mass = 0.0;
  while (true) {
    const scalar_t* row = probs + cur * V;
    mass = row_mass(row, V, blocks);
    if (mass < 0.0) fail_bad_probs_row("verify_sample", cur);
    rejected.clear();
    int64_t next = -1;
    for (int64_t k = start[cur]; k < start[cur + 1]; ++k) {
      const int64_t c = kids[k];
      const int64_t x = tok[c];
      const bool seen = contains(rejected, x);
      const double px = seen ? 0.0 : static_cast<double>(row[x]);
      if (u[c] * mass < px) {
        next = c;
        break;
      }
      if (!seen) {
        mass -= px;
        rejected.push_back(x);
      }
    }
    if (next < 0) break;
    path.push_back(next);
    cur = next;
  }
  return {path, residual_inverse_cdf(probs + cur * V, V, blocks, rejected, u[0] * mass)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_sample_cpu(const at::Tensor& tokens_in,
                                                     const at::Tensor& parents_in,
                                                     const at::Tensor& probs_in,
                                                     const at::Tensor& uniforms_in) {
  const char* op = "verify_sample";
  check_sample_args(tokens_in, parents_in, probs_in, uniforms_in);
  const int64_t T = tokens_in.numel();
  const at::Tensor parents = parents_in.contiguous();
  check_parents(parents, op);
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t V = probs_in.size(1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t i = 1; i < T; ++i) {
    TORCH_CHECK_VALUE(tok[i] >= 0 && tok[i] < V, op, ": tokens[", i, "] = ", tok[i],
                      " is outside the vocabulary of size ", V);
  }
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor uniforms = uniforms_in.contiguous();
  const double* u = uniforms.data_ptr<double>();
  for (int64_t i = 0; i < T; ++i) {
    if (!(u[i] >= 0.0 && u[i] < 1.0)) fail_bad_uniform(op, i, u[i]);
  }
  std::tuple<std::vector<int64_t>, int64_t> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "verify_sample", [&] {
    res = sample_walk<scalar_t>(parents.data_ptr<int32_t>(), tok, probs.data_ptr<scalar_t>(), T, V,
                                uniforms.data_ptr<double>());
  });
  return {to_tensor(std::get<0>(res), tokens.options()),
          at::scalar_tensor(std::get<1>(res), tokens.options())};
}

void check_compact_args(at::TensorList caches, int64_t prefix_len, const at::Tensor& accepted,
                        const int64_t* acc) {
  const char* op = "compact_kv";
  TORCH_CHECK_VALUE(!caches.empty(), op, ": caches is empty");
  const at::Tensor& c0 = caches[0];
  TORCH_CHECK_VALUE(c0.dim() == 4, op, ": caches must be [B, Hkv, S, D], got shape ", c0.sizes());
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    TORCH_CHECK_VALUE(c.sizes() == c0.sizes(), op, ": caches[", i, "] has shape ", c.sizes(),
                      " but caches[0] has ", c0.sizes());
    TORCH_CHECK_VALUE(c.scalar_type() == c0.scalar_type(), op, ": caches[", i, "] is ",
                      c.scalar_type(), " but caches[0] is ", c0.scalar_type());
    TORCH_CHECK_VALUE(c.device() == c0.device(), op, ": caches[", i, "] is on ", c.device(),
                      " but caches[0] is on ", c0.device());
    TORCH_CHECK_VALUE(c.stride(3) == 1, op, ": caches[", i,
                      "] must be contiguous in the head dimension (stride(-1) == 1)");
  }
  check_vec(accepted, op, "accepted", at::kLong);
  check_same_device(c0, accepted, op, "caches", "accepted");
  check_caches_disjoint(caches, op);
  const int64_t S = c0.size(2);
  TORCH_CHECK_VALUE(prefix_len >= 0 && prefix_len <= S, op, ": prefix_len ", prefix_len,
                    " is outside the cache length ", S);
  const int64_t n = accepted.numel();
  for (int64_t i = 0; i < n; ++i) {
    // Written as acc < S - prefix_len: prefix_len + acc overflows for acc near 2^63.
    TORCH_CHECK_VALUE(acc[i] >= 0 && acc[i] < S - prefix_len, op, ": accepted[", i, "] = ", acc[i],
                      " points outside the ", S - prefix_len, " tree slots after the prefix");
    TORCH_CHECK_VALUE(i == 0 || acc[i] > acc[i - 1], op,
                      ": accepted must be strictly increasing (a root-to-node path in topological "
                      "order), got accepted[",
                      i - 1, "] = ", acc[i - 1], ", accepted[", i, "] = ", acc[i]);
  }
}

void compact_kv_cpu(at::TensorList caches, int64_t prefix_len, const at::Tensor& accepted_in) {
  const at::Tensor accepted = accepted_in.contiguous();
  TORCH_CHECK_VALUE(accepted.scalar_type() == at::kLong, "compact_kv: accepted must be int64, got ",
                    accepted.scalar_type());
  const int64_t* acc = accepted.data_ptr<int64_t>();
  check_compact_args(caches, prefix_len, accepted, acc);
  const int64_t n = accepted.numel();
  const at::Tensor& c0 = caches[0];
  const int64_t B = c0.size(0), H = c0.size(1), D = c0.size(3);
  const int64_t row_bytes = D * c0.element_size();
  const int64_t jobs = static_cast<int64_t>(caches.size()) * B * H;
  // Rows move towards the prefix in increasing order and accepted[i] >= i, so no source row is
  // overwritten before it is read.
  at::parallel_for(0, jobs, 64, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / (B * H), b = (job / H) % B, h = job % H;
      const at::Tensor& c = caches[t];
      char* base = static_cast<char*>(c.data_ptr()) +
                   (b * c.stride(0) + h * c.stride(1)) * c.element_size();
      const int64_t ss = c.stride(2) * c.element_size();
      for (int64_t i = 0; i < n; ++i) {
        if (acc[i] == i) continue;
        std::memcpy(base + (prefix_len + i) * ss, base + (prefix_len + acc[i]) * ss, row_bytes);
      }
    }
  });
}

}  // namespace c2t_fast
