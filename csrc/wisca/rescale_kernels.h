// Torch-free launchers of the CUDA WISCA rescale (raw pointers + stream). Torch-facing side:
// rescale_cuda.cpp. Three launches for all layers together: reduce (row sums of W_q/W_k/W_v and
// column sums of W_o, fp64, fixed order), factors (one thread per layer), apply (every segment).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace wisca_fast {
namespace cuda {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct ReduceArgs {
  const void* const* wq;  // device arrays of L pointers each
  const void* const* wk;
  const void* const* wv;
  const void* const* wo;
  DType dtype;  // all four weights share it
  int64_t L, QR, KR, C;
  bool fro;
};

// sums: [L, 2*QR + 2*KR] fp64 = (rq, rk, rv, co) per layer.
cudaError_t reduce(const ReduceArgs& a, double* sums, cudaStream_t stream);

struct FactorArgs {
  int64_t L, Hq, Hkv, D;
  bool channel, fro, interleaved, qk, vo, pow2;
  double clamp_lo, clamp_hi, eps;
};

// mults: [L, 2*QR + 2*KR] fp64 = (m_q, m_k, m_v, m_o); factors float [L, 2] or [L, 2, Hkv, D];
// bad: device int32, set to (layer + 1) of the first layer with non-finite sums, else 0.
cudaError_t factors(const FactorArgs& a, const double* sums, double* mults, float* factors, int32_t* bad,
                    cudaStream_t stream);

// One in-place scaling job: t[r, c] *= mult[by_row ? r : c] ^ power (power 1, -1 or -2), or, for a
// shadow (src != nullptr), t = src converted to t's dtype.
struct Segment {
  void* ptr;
  const void* src;
  const double* mult;
  int64_t rows, cols;
  int32_t dtype, src_dtype, power, by_row;
};

cudaError_t apply(const Segment* segments, int32_t n_segments, int64_t max_elems, cudaStream_t stream);

}  // namespace cuda
}  // namespace wisca_fast
