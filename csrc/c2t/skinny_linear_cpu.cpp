// c2t_fast::skinny_linear: y = x @ weight.T (+ bias) for few rows of x, fp32, CPU.
//
// Why our own GEMM: a tree verification multiplies 1-64 token rows by every weight of the target, and
// on a CPU that pass should cost about what reading the weights once costs (a 1-row step reads them
// too). MKL's sgemm re-packs both operands on every call and for M = 2-16 rows ran at 1.5-3x its
// 1-row time on our 2-core VM; here each weight row is read from memory exactly once per call and
// multiplied, while it sits in L1, with every row of x (which stays in L1/L2: M <= 32 rows routed here).
//
// The micro-kernel keeps a 3 (x rows) x 4 (weight rows) block of 8-lane fp32 accumulators along K
// (12 FMAs per 7 loads) and reduces them horizontally at the end. Accumulation order differs from
// MKL's, so results agree to fp32 rounding (~1e-6 relative), not bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define C2T_SKINNY_X86 1
#else
#define C2T_SKINNY_X86 0
#endif

namespace c2t_fast {
namespace {

constexpr int64_t kNR = 4;  // weight rows per micro-tile
constexpr int64_t kMR = 3;  // x rows per micro-tile
// How far ahead the weights are prefetched (tiles of kNR rows), and into which cache level; 1-4 tiles
// and T0/T1 measured within the VM's noise of each other, 2 and T0 kept.
#ifndef C2T_PF_TILES
#define C2T_PF_TILES 2
#endif
#ifndef C2T_PF_HINT
#define C2T_PF_HINT _MM_HINT_T0
#endif

// Cache lines of a later weight tile still to prefetch (the tiles of one thread are contiguous rows).
struct Prefetch {
  const char* next;
  const char* end;
};

// Portable path (any CPU): the same blocking, plain loops the compiler may vectorise.
template <int MR>
void tile_generic(const float* x, int64_t ldx, const float* w, int64_t K, int64_t nr, float* out, int64_t ldo,
                  Prefetch&) {
  for (int i = 0; i < MR; ++i) {
    for (int64_t j = 0; j < nr; ++j) {
      const float* xi = x + i * ldx;
      const float* wj = w + j * K;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xi[k] * wj[k];
      out[i * ldo + j] = s;
    }
  }
}

#if C2T_SKINNY_X86
__attribute__((target("avx2,fma"))) inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  // [sum a0, sum a1, sum a2, sum a3]
  const __m256 s01 = _mm256_hadd_ps(a0, a1);
  const __m256 s23 = _mm256_hadd_ps(a2, a3);
  const __m256 s = _mm256_hadd_ps(s01, s23);
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// MR x-rows times 4 weight rows (rows past nr point at row 0 and are not stored).
template <int MR>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t ldx, const float* w, int64_t K,
                                                   int64_t nr, float* out, int64_t ldo, Prefetch& pf) {
  const float* wr[kNR];
  for (int64_t j = 0; j < kNR; ++j) wr[j] = w + (j < nr ? j : 0) * K;
  __m256 acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    if (pf.next < pf.end) {  // one line of a later tile per step: memory streams while we compute
      _mm_prefetch(pf.next, C2T_PF_HINT);
      pf.next += 64;
    }
    const __m256 w0 = _mm256_loadu_ps(wr[0] + k), w1 = _mm256_loadu_ps(wr[1] + k);
    const __m256 w2 = _mm256_loadu_ps(wr[2] + k), w3 = _mm256_loadu_ps(wr[3] + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm256_fmadd_ps(xv, w2, acc[i][2]);
      acc[i][3] = _mm256_fmadd_ps(xv, w3, acc[i][3]);
    }
  }
  if (K8 < K) {  // the K % 8 tail through masked loads: never reads past a row
    alignas(32) int32_t lanes[8];
    for (int l = 0; l < 8; ++l) lanes[l] = (K8 + l < K) ? -1 : 0;
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    const __m256 w0 = _mm256_maskload_ps(wr[0] + K8, mask), w1 = _mm256_maskload_ps(wr[1] + K8, mask);
    const __m256 w2 = _mm256_maskload_ps(wr[2] + K8, mask), w3 = _mm256_maskload_ps(wr[3] + K8, mask);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_maskload_ps(x + i * ldx + K8, mask);
      acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm256_fmadd_ps(xv, w2, acc[i][2]);
      acc[i][3] = _mm256_fmadd_ps(xv, w3, acc[i][3]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(16) float s[4];
    _mm_store_ps(s, hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    for (int64_t j = 0; j < nr; ++j) out[i * ldo + j] = s[j];
  }
}

bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_has_avx2_fma() { return false; }
#endif

// C2T_FAST_SKINNY_PORTABLE=1 forces the portable loop (to test it on an AVX2 machine).
bool use_avx2() {
  static const bool ok = [] {
    const char* force = std::getenv("C2T_FAST_SKINNY_PORTABLE");
    return cpu_has_avx2_fma() && !(force != nullptr && std::string(force) == "1");
  }();
  return ok;
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, Prefetch&);

template <int MR>
TileFn tile_for(bool avx2) {
#if C2T_SKINNY_X86
  if (avx2) return &tile_avx2<MR>;
#endif
  (void)avx2;
  return &tile_generic<MR>;
}

void check_skinny_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "skinny_linear";
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.dim() == 2, op, ": x must be float32 [M, K], got ",
                    x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat && weight.dim() == 2, op,
                    ": weight must be float32 [N, K], got ", weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), op, ": weight must be [N, K] with K = x.size(1) = ", x.size(1),
                    ", got ", weight.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), op, ": x and weight must be CPU tensors, got ",
                    x.device(), " and ", weight.device());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous (row-major [N, K])");
  TORCH_CHECK_VALUE(x.stride(1) == 1 || x.size(1) <= 1, op, ": x must have unit stride along K, got strides ",
                    x.strides());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                          bias->device().is_cpu(),
                      op, ": bias must be a float32 CPU tensor [N] = [", weight.size(0), "], got ",
                      bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
}

}  // namespace

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_skinny_linear_args(x, weight, bias);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return bias.has_value() ? out.copy_(bias->expand({M, N})) : out.zero_();
  const bool avx2 = use_avx2();
  if (!avx2) {
    TORCH_WARN_ONCE("c2t_fast::skinny_linear: running its portable loop (",
                    cpu_has_avx2_fma() ? "C2T_FAST_SKINNY_PORTABLE=1" : "this CPU lacks AVX2/FMA",
                    "), several times slower than the AVX2 kernel");
  }
  const TileFn t3 = tile_for<3>(avx2), t2 = tile_for<2>(avx2), t1 = tile_for<1>(avx2);
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t n_tiles = (N + kNR - 1) / kNR;
  // Each thread owns a contiguous range of weight rows: the weights stream from memory once.
  at::parallel_for(0, n_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kNR, nr = std::min(kNR, N - n0);
      const float* w = wp + n0 * K;
      const int64_t pf_first = std::min(N, n0 + C2T_PF_TILES * kNR), pf_last = std::min(N, pf_first + kNR);
      Prefetch pf{reinterpret_cast<const char*>(wp + pf_first * K), reinterpret_cast<const char*>(wp + pf_last * K)};
      int64_t m = 0;
      for (; m + kMR <= M; m += kMR) t3(xp + m * ldx, ldx, w, K, nr, op + m * N + n0, N, pf);
      if (M - m == 2) t2(xp + m * ldx, ldx, w, K, nr, op + m * N + n0, N, pf);
      if (M - m == 1) t1(xp + m * ldx, ldx, w, K, nr, op + m * N + n0, N, pf);
      if (bp != nullptr)
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < nr; ++j) op[i * N + n0 + j] += bp[n0 + j];
    }
  });
  return out;
}

}  // namespace c2t_fast

// Schema in ops.cpp.
TORCH_LIBRARY_IMPL(c2t_fast, CPU, m) { m.impl("skinny_linear", &c2t_fast::skinny_linear_cpu); }

