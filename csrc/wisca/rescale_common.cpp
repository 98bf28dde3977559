// Argument checks and factor math of wisca_fast::rescale_attention_, shared by CPU and CUDA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "rescale.h"

namespace wisca_fast {
namespace {

const char* kOp = "rescale_attention_";

void check_matrix(const at::Tensor& t, int64_t rows, int64_t cols, int64_t layer, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && (cols < 0 || t.size(1) == cols), kOp, ": layer ",
                    layer, " ", name, " must be [", rows, ", ", cols < 0 ? std::string("C") : std::to_string(cols),
                    "] for the given head counts, got ", t.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), kOp, ": layer ", layer, " ", name,
                    " must be floating point, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": layer ", layer, " ", name, " must be contiguous");
}

void check_like(const at::Tensor& t, const at::Tensor& ref, int64_t layer, const char* what, const char* name) {
  if (t.numel() == 0) return;  // absent
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), kOp, ": layer ", layer, " ", what, " of ", name, " has shape ",
                    t.sizes(), ", expected ", ref.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), kOp, ": layer ", layer, " ", what, " of ", name,
                    " must be floating point");
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": layer ", layer, " ", what, " of ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == ref.device(), kOp, ": layer ", layer, " ", what, " of ", name, " is on ",
                    t.device(), " but the weight is on ", ref.device());
}

double finish(double x, bool fro) { return fro ? std::sqrt(x) : x; }

double make_factor(double num, double den, const RescaleArgs& a) {
  if (!(num >= a.eps) || !(den >= a.eps)) return 1.0;  // degenerate: leave the pair alone
  double f = std::sqrt(num / den);
  if (a.clamp_hi > 0) f = std::min(std::max(f, a.clamp_lo), a.clamp_hi);
  if (a.pow2) f = std::exp2(std::nearbyint(std::log2(f)));
  return f;
}

// Every tensor is scaled in place once, so no two may share memory (the same weight listed twice would
// be scaled twice). All are contiguous (checked above), so two overlap iff their byte extents do.
void check_disjoint(std::initializer_list<at::TensorList> lists) {
  static const char* kList[5] = {"weights", "biases", "exp_avg", "exp_avg_sq", "shadows"};
  struct Extent {
    uintptr_t lo, hi;
    int list;
    size_t idx;
  };
  std::vector<Extent> ext;
  int li = 0;
  for (at::TensorList ts : lists) {
    for (size_t i = 0; i < ts.size(); ++i) {
      if (ts[i].numel() == 0) continue;
      const uintptr_t lo = reinterpret_cast<uintptr_t>(ts[i].data_ptr());
      ext.push_back({lo, lo + static_cast<uintptr_t>(ts[i].numel() * ts[i].element_size()), li, i});
    }
    ++li;
  }
  std::sort(ext.begin(), ext.end(), [](const Extent& x, const Extent& y) { return x.lo < y.lo; });
  for (size_t k = 1; k < ext.size(); ++k) {
    const Extent &x = ext[k - 1], &y = ext[k];
    TORCH_CHECK_VALUE(y.lo >= x.hi, kOp, ": ", kList[x.list], "[", x.idx, "] and ", kList[y.list], "[", y.idx,
                      "] share memory; every tensor must be passed once and be its own storage region");
  }
}

}  // namespace

RescaleArgs check_rescale_args(at::TensorList weights, at::TensorList biases, at::TensorList exp_avg,
                               at::TensorList exp_avg_sq, at::TensorList shadows, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, const std::string& granularity,
                               const std::string& norm, bool rope_interleaved, bool qk, bool vo,
                               double clamp_lo, double clamp_hi, bool pow2, double eps) {
  RescaleArgs a;
  TORCH_CHECK_VALUE(!weights.empty() && weights.size() % layout::kWeights == 0, kOp,
                    ": weights must list (q, k, v, o) for every layer, got ", weights.size(), " tensors");
  a.L = static_cast<int64_t>(weights.size()) / layout::kWeights;
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, kOp, ": ", num_heads,
                    " query heads do not divide into ", num_kv_heads, " KV heads");
  TORCH_CHECK_VALUE(head_dim > 0, kOp, ": head_dim must be positive, got ", head_dim);
  TORCH_CHECK_VALUE(granularity == "tensor" || granularity == "channel", kOp,
                    ": granularity must be 'tensor' or 'channel', got '", granularity, "'");
  TORCH_CHECK_VALUE(norm == "l1" || norm == "fro", kOp, ": norm must be 'l1' or 'fro', got '", norm, "'");
  TORCH_CHECK_VALUE(clamp_hi == 0 || (clamp_lo > 0 && clamp_lo <= clamp_hi), kOp,
                    ": clamp must be 0 < lo <= hi (or hi = 0 for none), got [", clamp_lo, ", ", clamp_hi, "]");
  TORCH_CHECK_VALUE(eps >= 0, kOp, ": eps must be >= 0");
  a.Hq = num_heads;
  a.Hkv = num_kv_heads;
  a.D = head_dim;
  a.channel = granularity == "channel";
  a.fro = norm == "fro";
  a.interleaved = rope_interleaved;
  a.qk = qk;
  a.vo = vo;
  a.pow2 = pow2;
  a.clamp_lo = clamp_lo;
  a.clamp_hi = clamp_hi;
  a.eps = eps;
  TORCH_CHECK_VALUE(!(a.channel && qk && head_dim % 2), kOp,
                    ": channel-wise Q/K needs an even head_dim (RoPE pairs), got ", head_dim);
  TORCH_CHECK_VALUE(biases.empty() || static_cast<int64_t>(biases.size()) == layout::kBiases * a.L, kOp,
                    ": biases must be empty or list (q, k, v) per layer (", layout::kBiases * a.L, "), got ",
                    biases.size());
  TORCH_CHECK_VALUE(exp_avg.size() == exp_avg_sq.size(), kOp, ": exp_avg and exp_avg_sq differ in length");
  TORCH_CHECK_VALUE(exp_avg.empty() || static_cast<int64_t>(exp_avg.size()) == layout::kMoments * a.L, kOp,
                    ": exp_avg must be empty or list (q, k, v, o, bq, bk, bv) per layer (", layout::kMoments * a.L,
                    "), got ", exp_avg.size());
  TORCH_CHECK_VALUE(shadows.empty() || static_cast<int64_t>(shadows.size()) == layout::kShadows * a.L, kOp,
                    ": shadows must be empty or list (q, k, v, o) per layer (", layout::kShadows * a.L, "), got ",
                    shadows.size());
  a.has_bias = !biases.empty();
  a.has_state = !exp_avg.empty();
  a.has_shadow = !shadows.empty();
  const at::Device dev = weights[0].device();
  const int64_t qrows = a.Hq * a.D, kvrows = a.Hkv * a.D;
  const char* names[4] = {"W_q", "W_k", "W_v", "W_o"};
  for (int64_t l = 0; l < a.L; ++l) {
    const at::Tensor& wq = weights[layout::weight(l, 0)];
    check_matrix(wq, qrows, -1, l, "W_q");
    const int64_t C = wq.size(1);
    check_matrix(weights[layout::weight(l, 1)], kvrows, C, l, "W_k");
    check_matrix(weights[layout::weight(l, 2)], kvrows, C, l, "W_v");
    check_matrix(weights[layout::weight(l, 3)], C, qrows, l, "W_o");
    for (int i = 0; i < layout::kWeights; ++i) {
      const at::Tensor& w = weights[layout::weight(l, i)];
      TORCH_CHECK_VALUE(w.device() == dev, kOp, ": layer ", l, " ", names[i], " is on ", w.device(),
                        " but layer 0 W_q is on ", dev);
      if (a.has_state) {
        const int64_t m = layout::moment(l, i);
        check_like(exp_avg[m], w, l, "exp_avg", names[i]);
        check_like(exp_avg_sq[m], w, l, "exp_avg_sq", names[i]);
        TORCH_CHECK_VALUE((exp_avg[m].numel() == 0) == (exp_avg_sq[m].numel() == 0), kOp,
                          ": layer ", l, " ", names[i], " has only one of exp_avg / exp_avg_sq");
      }
      if (a.has_shadow) check_like(shadows[layout::shadow(l, i)], w, l, "shadow", names[i]);
    }
    if (a.has_bias) {
      for (int i = 0; i < layout::kBiases; ++i) {
        const at::Tensor& b = biases[layout::bias(l, i)];
        if (b.numel() == 0) continue;
        const int64_t rows = weights[layout::weight(l, i)].size(0);
        TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == rows, kOp, ": layer ", l, " bias of ", names[i],
                          " must be [", rows, "], got ", b.sizes());
        TORCH_CHECK_VALUE(at::isFloatingType(b.scalar_type()) && b.is_contiguous() && b.device() == dev, kOp,
                          ": layer ", l, " bias of ", names[i], " must be a contiguous floating tensor on ", dev);
        if (a.has_state) {
          check_like(exp_avg[layout::bias_moment(l, i)], b, l, "exp_avg", "a bias");
          check_like(exp_avg_sq[layout::bias_moment(l, i)], b, l, "exp_avg_sq", "a bias");
        }
      }
    }
  }
  check_disjoint({weights, biases, exp_avg, exp_avg_sq, shadows});
  return a;
}

void layer_factors(const RescaleArgs& a, int64_t layer, const double* rq, const double* rk, const double* rv,
                   const double* co, double* mq, double* mk, double* mv, double* mo, float* factors) {
  const int64_t g = a.Hq / a.Hkv, D = a.D, Hkv = a.Hkv;
  for (int64_t i = 0; i < a.Hq * D; ++i)
    TORCH_CHECK_VALUE(std::isfinite(rq[i]) && std::isfinite(co[i]), kOp, ": non-finite values in layer ", layer,
                      std::isfinite(rq[i]) ? " W_o" : " W_q", "; nothing was rescaled");
  for (int64_t i = 0; i < Hkv * D; ++i)
    TORCH_CHECK_VALUE(std::isfinite(rk[i]) && std::isfinite(rv[i]), kOp, ": non-finite values in layer ", layer,
                      std::isfinite(rk[i]) ? " W_v" : " W_k", "; nothing was rescaled");
  std::vector<double> s(Hkv * D, 1.0), t(Hkv * D, 1.0);
  if (!a.channel) {
    double nq = 0, nk = 0, nv = 0, no = 0;  // fixed order sums
    for (int64_t i = 0; i < a.Hq * D; ++i) nq += rq[i];
    for (int64_t i = 0; i < Hkv * D; ++i) nk += rk[i];
    for (int64_t i = 0; i < Hkv * D; ++i) nv += rv[i];
    for (int64_t i = 0; i < a.Hq * D; ++i) no += co[i];
    const double sf = a.qk ? make_factor(finish(nk, a.fro), finish(nq, a.fro), a) : 1.0;
    const double tf = a.vo ? make_factor(finish(no, a.fro), finish(nv, a.fro), a) : 1.0;
    std::fill(s.begin(), s.end(), sf);
    std::fill(t.begin(), t.end(), tf);
    factors[0] = static_cast<float>(sf);
    factors[1] = static_cast<float>(tf);
  } else {
    for (int64_t h = 0; h < Hkv; ++h) {
      std::vector<double> nq(D, 0.0), no(D, 0.0);
      for (int64_t i = 0; i < g; ++i)
        for (int64_t j = 0; j < D; ++j) {
          nq[j] += rq[(h * g + i) * D + j];
          no[j] += co[(h * g + i) * D + j];
        }
      for (int64_t j = 0; j < D; ++j) {
        if (a.qk) {
          const int64_t partner = a.interleaved ? (j ^ 1) : (j < D / 2 ? j + D / 2 : j - D / 2);
          const int64_t lo = std::min(j, partner), hi = std::max(j, partner);
          s[h * D + j] = make_factor(finish(rk[h * D + lo] + rk[h * D + hi], a.fro),
                                     finish(nq[lo] + nq[hi], a.fro), a);
        }
        if (a.vo) t[h * D + j] = make_factor(finish(no[j], a.fro), finish(rv[h * D + j], a.fro), a);
        factors[h * D + j] = static_cast<float>(s[h * D + j]);
        factors[Hkv * D + h * D + j] = static_cast<float>(t[h * D + j]);
      }
    }
  }
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t j = 0; j < D; ++j) {
      const double sv = s[h * D + j], tv = t[h * D + j];
      mk[h * D + j] = 1.0 / sv;
      mv[h * D + j] = tv;
      for (int64_t i = 0; i < g; ++i) {
        mq[(h * g + i) * D + j] = sv;
        mo[(h * g + i) * D + j] = 1.0 / tv;
      }
    }
}

}  // namespace wisca_fast
