// wisca_fast::rescale_attention_: shared argument checks and the factor math (CPU and CUDA).
#pragma once

#include <torch/types.h>

#include <string>
#include <vector>

namespace wisca_fast {

// The op's flat tensor lists, per layer l (wisca_fast/layout.py is the Python side of the same table):
// weights (q, k, v, o) at 4l + i; biases (q, k, v) at 3l + i; exp_avg / exp_avg_sq (q, k, v, o weights,
// then q, k, v biases) at 7l + i; shadows (q, k, v, o) at 4l + i. Empty tensors mark absent entries.
namespace layout {
constexpr int64_t kWeights = 4, kBiases = 3, kMoments = 7, kShadows = 4;
inline int64_t weight(int64_t l, int64_t i) { return kWeights * l + i; }
inline int64_t bias(int64_t l, int64_t i) { return kBiases * l + i; }
inline int64_t moment(int64_t l, int64_t i) { return kMoments * l + i; }                   // of weight i
inline int64_t bias_moment(int64_t l, int64_t i) { return kMoments * l + kWeights + i; }  // of bias i
inline int64_t shadow(int64_t l, int64_t i) { return kShadows * l + i; }
}  // namespace layout

struct RescaleArgs {
  int64_t L = 0, Hq = 0, Hkv = 0, D = 0;
  bool channel = false, fro = false, interleaved = false, qk = true, vo = true, pow2 = false;
  double clamp_lo = 0, clamp_hi = 0, eps = 1e-12;
  bool has_bias = false, has_state = false, has_shadow = false;
};

// Validates every tensor (shapes against the head counts, dtypes, devices, layouts) before anything
// is read or written; throws ValueError naming the first problem.
RescaleArgs check_rescale_args(at::TensorList weights, at::TensorList biases, at::TensorList exp_avg,
                               at::TensorList exp_avg_sq, at::TensorList shadows, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, const std::string& granularity,
                               const std::string& norm, bool rope_interleaved, bool qk, bool vo,
                               double clamp_lo, double clamp_hi, bool pow2, double eps);

// From one layer's row sums (rq [Hq*D], rk, rv [Hkv*D]) and W_o column sums (co [Hq*D]) of |w| or w^2
// (fp64), the multipliers m_q, m_k, m_v (rows) and m_o (columns of W_o), and the layer's factors
// (tensor: 2 values; channel: 2 * Hkv * D values). Throws on non-finite sums.
void layer_factors(const RescaleArgs& a, int64_t layer, const double* rq, const double* rk, const double* rv,
                   const double* co, double* mq, double* mk, double* mv, double* mo, float* factors);

}  // namespace wisca_fast
