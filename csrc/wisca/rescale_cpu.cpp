// CPU kernel of wisca_fast::rescale_attention_: phase 1 reads every weight once and reduces row sums
// (and W_o column sums) in fp64 in a fixed order, independent of the thread count, so the factors are
// deterministic; phase 2 scales weights, biases, Adam moments and shadows in place. Nothing is written
// before every check (shapes, dtypes, devices, finite norms) has passed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "rescale.h"

namespace wisca_fast {
namespace {

// Sums run in fp32 over fixed blocks of kBlock elements (8 independent lanes, so the compiler
// vectorises them at the baseline ISA) and the block sums are added in fp64: a fixed order, hence
// deterministic, at memory speed.
constexpr int64_t kBlock = 512;

template <typename T>
inline float block_sum(const T* x, int64_t n, bool fro) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const float v = static_cast<float>(x[i + k]);
      acc[k] += fro ? v * v : std::fabs(v);
    }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    acc[0] += fro ? v * v : std::fabs(v);
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
void row_sums(const T* w, int64_t rows, int64_t cols, bool fro, double* out) {
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < cols; c += kBlock) s += block_sum(w + r * cols + c, std::min(kBlock, cols - c), fro);
    out[r] = s;
  }
}

template <typename T>
void col_sums(const T* w, int64_t rows, int64_t cols, bool fro, double* out) {
  std::fill(out, out + cols, 0.0);
  std::vector<float> acc(cols);
  for (int64_t r0 = 0; r0 < rows; r0 += 64) {  // fp32 over 64 rows, then into fp64
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t r = r0; r < std::min(rows, r0 + 64); ++r) {
      const T* row = w + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const float v = static_cast<float>(row[c]);
        acc[c] += fro ? v * v : std::fabs(v);
      }
    }
    for (int64_t c = 0; c < cols; ++c) out[c] += acc[c];
  }
}

// t[r, c] *= f where f = mult^power (power 1, -1 or -2) of row r (by_row) or column c. The per-row or
// per-column factor is formed once in fp64 and applied in fp32 (fp64 for fp64 tensors).
template <typename T>
void scale(T* t, int64_t rows, int64_t cols, const double* mult, bool by_row, int power) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  auto factor = [&](int64_t i) {
    const double m = mult[i];
    return static_cast<acc_t>(power == 1 ? m : power == -1 ? 1.0 / m : 1.0 / (m * m));
  };
  if (by_row) {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t f = factor(r);
      T* row = t + r * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<T>(static_cast<acc_t>(row[c]) * f);
    }
  } else {
    std::vector<acc_t> f(cols);
    for (int64_t c = 0; c < cols; ++c) f[c] = factor(c);
    for (int64_t r = 0; r < rows; ++r) {
      T* row = t + r * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<T>(static_cast<acc_t>(row[c]) * f[c]);
    }
  }
}

void scale_tensor(const at::Tensor& t, const double* mult, bool by_row, int power) {
  if (t.numel() == 0) return;
  const int64_t rows = t.size(0), cols = t.dim() == 2 ? t.size(1) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "wisca_scale", [&] {
    scale<scalar_t>(t.data_ptr<scalar_t>(), rows, cols, mult, by_row, power);
  });
}

}  // namespace

at::Tensor rescale_attention_cpu(at::TensorList weights, at::TensorList biases, at::TensorList exp_avg,
                                 at::TensorList exp_avg_sq, at::TensorList shadows, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, c10::string_view granularity,
                                 c10::string_view norm, bool rope_interleaved, bool qk, bool vo, double clamp_lo,
                                 double clamp_hi, bool pow2, double eps) {
  const RescaleArgs a = check_rescale_args(weights, biases, exp_avg, exp_avg_sq, shadows, num_heads, num_kv_heads,
                                           head_dim, std::string(granularity), std::string(norm), rope_interleaved,
                                           qk, vo, clamp_lo, clamp_hi, pow2, eps);
  for (const at::Tensor& w : weights)
    TORCH_CHECK_VALUE(w.device().is_cpu(), "rescale_attention_: expected CPU tensors, got ", w.device());
  const int64_t L = a.L, QR = a.Hq * a.D, KR = a.Hkv * a.D;
  // per layer: rq [QR], rk [KR], rv [KR], co [QR]
  std::vector<double> sums(L * (2 * QR + 2 * KR));
  auto layer_sums = [&](int64_t l) { return sums.data() + l * (2 * QR + 2 * KR); };
  // Phase 1: one task per (layer, matrix); each task's order is fixed.
  at::parallel_for(0, layout::kWeights * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t l = job / layout::kWeights, i = job % layout::kWeights;
      const at::Tensor& w = weights[layout::weight(l, i)];
      double* base = layer_sums(l);
      double* out = i == 0 ? base : i == 1 ? base + QR : i == 2 ? base + QR + KR : base + QR + 2 * KR;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "wisca_sums", [&] {
        if (i == 3)
          col_sums<scalar_t>(w.data_ptr<scalar_t>(), w.size(0), w.size(1), a.fro, out);
        else
          row_sums<scalar_t>(w.data_ptr<scalar_t>(), w.size(0), w.size(1), a.fro, out);
      });
    }
  });
  // Factors for every layer (all checks) before any write.
  const int64_t per_layer = a.channel ? 2 * KR : 2;
  at::Tensor factors = a.channel ? at::empty({L, 2, a.Hkv, a.D}, at::kFloat) : at::empty({L, 2}, at::kFloat);
  std::vector<double> mults(L * (2 * QR + 2 * KR));
  for (int64_t l = 0; l < L; ++l) {
    const double* s = layer_sums(l);
    double* m = mults.data() + l * (2 * QR + 2 * KR);
    layer_factors(a, l, s, s + QR, s + QR + KR, s + QR + 2 * KR, m, m + QR, m + QR + KR, m + QR + 2 * KR,
                  factors.data_ptr<float>() + l * per_layer);
  }
  // Phase 2: one task per (layer, matrix) with its bias, moments and shadow.
  at::parallel_for(0, layout::kWeights * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t l = job / layout::kWeights, i = job % layout::kWeights;
      const double* m = mults.data() + l * (2 * QR + 2 * KR);
      const double* mult = i == 0 ? m : i == 1 ? m + QR : i == 2 ? m + QR + KR : m + QR + 2 * KR;
      const bool by_row = i != 3;
      const at::Tensor& w = weights[layout::weight(l, i)];
      scale_tensor(w, mult, by_row, 1);
      if (a.has_state && exp_avg[layout::moment(l, i)].numel()) {
        scale_tensor(exp_avg[layout::moment(l, i)], mult, by_row, -1);
        scale_tensor(exp_avg_sq[layout::moment(l, i)], mult, by_row, -2);
      }
      if (a.has_shadow && shadows[layout::shadow(l, i)].numel()) shadows[layout::shadow(l, i)].copy_(w);
      if (i < layout::kBiases && a.has_bias && biases[layout::bias(l, i)].numel()) {
        scale_tensor(biases[layout::bias(l, i)], mult, true, 1);
        if (a.has_state && exp_avg[layout::bias_moment(l, i)].numel()) {
          scale_tensor(exp_avg[layout::bias_moment(l, i)], mult, true, -1);
          scale_tensor(exp_avg_sq[layout::bias_moment(l, i)], mult, true, -2);
        }
      }
    }
  });
  return factors;
}

}  // namespace wisca_fast
