// CUDA kernels of wisca_fast::rescale_attention_. Torch-free. Deterministic: every sum is formed in
// a fixed order (per-lane strided loops, then a fixed warp-shuffle tree); no floating-point atomics.
#include "rescale_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace wisca_fast {
namespace cuda {
namespace {

__device__ __forceinline__ double ld(const void* p, int32_t dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(p)[i];
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const double*>(p)[i];
  }
}

__device__ __forceinline__ void st(void* p, int32_t dtype, int64_t i, double x) {
  switch (dtype) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(x); break;
    case kF16: static_cast<__half*>(p)[i] = __float2half(static_cast<float>(x)); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(static_cast<float>(x)); break;
    default: static_cast<double*>(p)[i] = x;
  }
}

// One warp per row of W_q / W_k / W_v (all layers), rows numbered layer-major.
__global__ void row_sum_kernel(ReduceArgs a, double* sums) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int64_t per_layer = a.QR + 2 * a.KR;
  if (warp >= a.L * per_layer) return;
  const int64_t l = warp / per_layer;
  int64_t r = warp % per_layer;
  const void* w;
  int64_t out;
  if (r < a.QR) {
    w = a.wq[l];
    out = r;
  } else if (r < a.QR + a.KR) {
    r -= a.QR;
    w = a.wk[l];
    out = a.QR + r;
  } else {
    r -= a.QR + a.KR;
    w = a.wv[l];
    out = a.QR + a.KR + r;
  }
  double s = 0.0;
  for (int64_t c = lane; c < a.C; c += 32) {
    const double x = ld(w, a.dtype, r * a.C + c);
    s += a.fro ? x * x : fabs(x);
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (lane == 0) sums[l * (2 * a.QR + 2 * a.KR) + out] = s;
}

// One thread per column of W_o (all layers); adjacent threads read adjacent columns.
__global__ void col_sum_kernel(ReduceArgs a, double* sums) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= a.L * a.QR) return;
  const int64_t l = idx / a.QR, c = idx % a.QR;
  double s = 0.0;
  for (int64_t r = 0; r < a.C; ++r) {
    const double x = ld(a.wo[l], a.dtype, r * a.QR + c);
    s += a.fro ? x * x : fabs(x);
  }
  sums[l * (2 * a.QR + 2 * a.KR) + a.QR + 2 * a.KR + c] = s;
}

__device__ double make_factor(double num, double den, const FactorArgs& a) {
  if (!(num >= a.eps) || !(den >= a.eps)) return 1.0;
  double f = sqrt(num / den);
  if (a.clamp_hi > 0) f = fmin(fmax(f, a.clamp_lo), a.clamp_hi);
  if (a.pow2) f = exp2(nearbyint(log2(f)));
  return f;
}

__device__ __forceinline__ double fin(double x, bool fro) { return fro ? sqrt(x) : x; }

// One thread per layer: the factor math of rescale_common.cpp, in the same order.
__global__ void factor_kernel(FactorArgs a, const double* sums, double* mults, float* factors, int32_t* bad) {
  const int64_t l = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (l >= a.L) return;
  const int64_t g = a.Hq / a.Hkv, D = a.D, QR = a.Hq * D, KR = a.Hkv * D, stride = 2 * QR + 2 * KR;
  const double* rq = sums + l * stride;
  const double* rk = rq + QR;
  const double* rv = rk + KR;
  const double* co = rv + KR;
  double* mq = mults + l * stride;
  double* mk = mq + QR;
  double* mv = mk + KR;
  double* mo = mv + KR;
  for (int64_t i = 0; i < stride; ++i)
    if (!isfinite(rq[i])) {
      atomicMin(bad, static_cast<int32_t>(l + 1));
      return;
    }
  if (!a.channel) {
    double nq = 0, nk = 0, nv = 0, no = 0;
    for (int64_t i = 0; i < QR; ++i) nq += rq[i];
    for (int64_t i = 0; i < KR; ++i) nk += rk[i];
    for (int64_t i = 0; i < KR; ++i) nv += rv[i];
    for (int64_t i = 0; i < QR; ++i) no += co[i];
    const double s = a.qk ? make_factor(fin(nk, a.fro), fin(nq, a.fro), a) : 1.0;
    const double t = a.vo ? make_factor(fin(no, a.fro), fin(nv, a.fro), a) : 1.0;
    factors[2 * l] = static_cast<float>(s);
    factors[2 * l + 1] = static_cast<float>(t);
    for (int64_t i = 0; i < QR; ++i) {
      mq[i] = s;
      mo[i] = 1.0 / t;
    }
    for (int64_t i = 0; i < KR; ++i) {
      mk[i] = 1.0 / s;
      mv[i] = t;
    }
    return;
  }
  float* f = factors + l * 2 * KR;
  for (int64_t h = 0; h < a.Hkv; ++h)
    for (int64_t j = 0; j < D; ++j) {
      double s = 1.0, t = 1.0;
      if (a.qk) {
        const int64_t partner = a.interleaved ? (j ^ 1) : (j < D / 2 ? j + D / 2 : j - D / 2);
        const int64_t lo = min(j, partner), hi = max(j, partner);
        double nq_lo = 0, nq_hi = 0;
        for (int64_t i = 0; i < g; ++i) nq_lo += rq[(h * g + i) * D + lo];
        for (int64_t i = 0; i < g; ++i) nq_hi += rq[(h * g + i) * D + hi];
        s = make_factor(fin(rk[h * D + lo] + rk[h * D + hi], a.fro), fin(nq_lo + nq_hi, a.fro), a);
      }
      if (a.vo) {
        double no = 0;
        for (int64_t i = 0; i < g; ++i) no += co[(h * g + i) * D + j];
        t = make_factor(fin(no, a.fro), fin(rv[h * D + j], a.fro), a);
      }
      f[h * D + j] = static_cast<float>(s);
      f[KR + h * D + j] = static_cast<float>(t);
      mk[h * D + j] = 1.0 / s;
      mv[h * D + j] = t;
      for (int64_t i = 0; i < g; ++i) {
        mq[(h * g + i) * D + j] = s;
        mo[(h * g + i) * D + j] = 1.0 / t;
      }
    }
}

__global__ void apply_kernel(const Segment* segs, int64_t max_elems) {
  const Segment sg = segs[blockIdx.y];
  const int64_t n = sg.rows * sg.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (sg.src != nullptr) {
      st(sg.ptr, sg.dtype, i, ld(sg.src, sg.src_dtype, i));
      continue;
    }
    const double m = sg.mult[sg.by_row ? i / sg.cols : i % sg.cols];
    const double f = sg.power == 1 ? m : sg.power == -1 ? 1.0 / m : 1.0 / (m * m);
    st(sg.ptr, sg.dtype, i, ld(sg.ptr, sg.dtype, i) * f);
  }
}

}  // namespace

cudaError_t reduce(const ReduceArgs& a, double* sums, cudaStream_t stream) {
  const int64_t rows = a.L * (a.QR + 2 * a.KR);
  row_sum_kernel<<<(rows * 32 + 255) / 256, 256, 0, stream>>>(a, sums);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  col_sum_kernel<<<(a.L * a.QR + 255) / 256, 256, 0, stream>>>(a, sums);
  return cudaGetLastError();
}

cudaError_t factors(const FactorArgs& a, const double* sums, double* mults, float* factors_out, int32_t* bad,
                    cudaStream_t stream) {
  factor_kernel<<<(a.L + 63) / 64, 64, 0, stream>>>(a, sums, mults, factors_out, bad);
  return cudaGetLastError();
}

cudaError_t apply(const Segment* segments, int32_t n_segments, int64_t max_elems, cudaStream_t stream) {
  if (n_segments == 0) return cudaSuccess;
  const int64_t blocks = (max_elems + 255) / 256;
  const dim3 grid(static_cast<unsigned>(blocks < 1024 ? blocks : 1024), n_segments);
  apply_kernel<<<grid, 256, 0, stream>>>(segments, max_elems);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace wisca_fast
