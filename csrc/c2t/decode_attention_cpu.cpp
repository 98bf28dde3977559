// c2t_fast::decode_attention: one query token per sequence attending its own cached keys, CPU.
//
// Why our own kernel: a batched decoding step of the self-distillation generator (64+ sequences, one new
// token each) must read every sequence's K/V cache once; that read, not the arithmetic, bounds it. torch's
// batched matmul (q @ K^T, then p @ V) reads fp32 caches at ~60% of the machine's bandwidth and copies
// bf16/fp16 strided cache views to contiguous ones first (2-3x the bytes). Here each (sequence, KV head)
// reads its K rows and V rows once, in whichever precision the cache is kept (fp32, bf16 or fp16), and
// serves the G query heads of its group from each row while it sits in L1. Accumulation is fp32.
//
// Batch invariance: a row's output depends only on its own query, cache rows and length (each
// (sequence, head) is one task with a fixed summation order), which lets a generator restart one
// interrupted sequence in another batch and write the same bytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define C2T_DECODE_X86 1
#else
#define C2T_DECODE_X86 0
#endif

namespace c2t_fast {
namespace {

constexpr int64_t kMaxGroup = 16;  // query heads per KV head served from one cache row

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// The maximum of a head's scores; ``bad`` when one is NaN or the maximum is +inf, where softmax (as torch
// computes it) is NaN for the whole row.
inline float row_max(const float* s, int64_t len, bool& bad) {
  float m = -std::numeric_limits<float>::infinity();
  bad = false;
  for (int64_t i = 0; i < len; ++i) {
    if (std::isnan(s[i])) bad = true;
    else if (s[i] > m) m = s[i];
  }
  bad = bad || (std::isinf(m) && m > 0);
  return bad ? 0.f : m;
}

inline void poison_bad(const bool* bad, int64_t G, int64_t D, float* out) {
  for (int64_t g = 0; g < G; ++g)
    if (bad[g])
      for (int64_t d = 0; d < D; ++d) out[g * D + d] = std::numeric_limits<float>::quiet_NaN();
}

// Portable path: plain loops, std::exp.
template <typename T>
void head_generic(const float* q, int64_t G, const T* k, int64_t k_row, const T* v, int64_t v_row, int64_t len,
                  int64_t D, float* scores, float* out) {
  std::vector<float> row(D);
  for (int64_t j = 0; j < len; ++j) {
    for (int64_t d = 0; d < D; ++d) row[d] = to_float(k[j * k_row + d]);
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * row[d];
      scores[g * len + j] = s;
    }
  }
  bool bad[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * len;
    const float m = row_max(sg, len, bad[g]);
    float sum = 0.f;
    for (int64_t j = 0; j < len; ++j) {
      sg[j] = std::exp(sg[j] - m);
      sum += sg[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < len; ++j) sg[j] *= inv;
  }
  std::memset(out, 0, sizeof(float) * G * D);
  for (int64_t j = 0; j < len; ++j) {
    for (int64_t d = 0; d < D; ++d) row[d] = to_float(v[j * v_row + d]);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * len + j];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += p * row[d];
    }
  }
  poison_bad(bad, G, D, out);
}

#if C2T_DECODE_X86
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 a) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// exp(x) for x <= 0 (softmax after subtracting the maximum): 2^n * p(r), r in [-ln2/2, ln2/2], a degree-6
// polynomial (Cephes' expf coefficients), ~1 ulp; x below -87 gives 0, -inf gives 0.
__attribute__((target("avx2,fma,f16c"))) inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Four positions' dot products with one query chunk-block at a time: [G][4] accumulators, reduced to a
// vector of 4 sums per query (no per-position horizontal sum).
__attribute__((target("avx2,fma,f16c"))) inline __m128 hsum4x(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// scores[a][j..j+3] = q_a . k_j..k_{j+3} for NA query heads: 4 x NA accumulators in registers, each
// cache row converted once for all NA heads.
template <int NA, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void dots4(const float* q, int64_t D8, int64_t D, const T* k,
                                                           int64_t k_row, float* scores, int64_t len) {
  __m256 acc[NA][4];
  for (int a = 0; a < NA; ++a)
    for (int r = 0; r < 4; ++r) acc[a][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D8; ++c) {
    const __m256 k0 = load8(k + 8 * c), k1 = load8(k + k_row + 8 * c);
    const __m256 k2 = load8(k + 2 * k_row + 8 * c), k3 = load8(k + 3 * k_row + 8 * c);
    for (int a = 0; a < NA; ++a) {
      const __m256 qv = _mm256_loadu_ps(q + a * D + 8 * c);
      acc[a][0] = _mm256_fmadd_ps(qv, k0, acc[a][0]);
      acc[a][1] = _mm256_fmadd_ps(qv, k1, acc[a][1]);
      acc[a][2] = _mm256_fmadd_ps(qv, k2, acc[a][2]);
      acc[a][3] = _mm256_fmadd_ps(qv, k3, acc[a][3]);
    }
  }
  for (int a = 0; a < NA; ++a) _mm_storeu_ps(scores + a * len, hsum4x(acc[a][0], acc[a][1], acc[a][2], acc[a][3]));
}

// out[a][c*8 .. c*8+15] = sum_j p[a][j] v_j[c*8 .. c*8+15] for NA query heads (2 x NA accumulators).
template <int NA, bool TWO, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void axpy2(const float* p, int64_t len, const T* v, int64_t v_row,
                                                           float* out, int64_t D) {
  __m256 acc[NA][2];
  for (int a = 0; a < NA; ++a) acc[a][0] = acc[a][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; ++i) {
    const T* vi = v + i * v_row;
    const __m256 v0 = load8(vi);
    const __m256 v1 = TWO ? load8(vi + 8) : _mm256_setzero_ps();
    for (int a = 0; a < NA; ++a) {
      const __m256 pa = _mm256_broadcast_ss(p + a * len + i);
      acc[a][0] = _mm256_fmadd_ps(pa, v0, acc[a][0]);
      if (TWO) acc[a][1] = _mm256_fmadd_ps(pa, v1, acc[a][1]);
    }
  }
  for (int a = 0; a < NA; ++a) {
    _mm256_storeu_ps(out + a * D, acc[a][0]);
    if (TWO) _mm256_storeu_ps(out + a * D + 8, acc[a][1]);
  }
}

template <bool TWO, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void axpy2_heads(int64_t na, const float* p, int64_t len, const T* v,
                                                                 int64_t v_row, float* out, int64_t D) {
  switch (na) {
    case 1: axpy2<1, TWO>(p, len, v, v_row, out, D); break;
    case 2: axpy2<2, TWO>(p, len, v, v_row, out, D); break;
    case 3: axpy2<3, TWO>(p, len, v, v_row, out, D); break;
    default: axpy2<4, TWO>(p, len, v, v_row, out, D); break;
  }
}

// D % 8 == 0, G <= kMaxGroup, D <= 256.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void head_avx2(const float* q, int64_t G, const T* k, int64_t k_row,
                                                        const T* v, int64_t v_row, int64_t len, int64_t D,
                                                        float* scores, float* out) {
  const int64_t D8 = D / 8;
  int64_t j = 0;
  for (; j + 4 <= len; j += 4) {
    for (int64_t g0 = 0; g0 < G; g0 += 3) {
      const T* kj = k + j * k_row;
      float* sj = scores + g0 * len + j;
      switch (std::min<int64_t>(3, G - g0)) {
        case 1: dots4<1>(q + g0 * D, D8, D, kj, k_row, sj, len); break;
        case 2: dots4<2>(q + g0 * D, D8, D, kj, k_row, sj, len); break;
        default: dots4<3>(q + g0 * D, D8, D, kj, k_row, sj, len); break;
      }
    }
  }
  for (; j < len; ++j) {
    const T* kj = k + j * k_row;
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < D8; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + 8 * c), load8(kj + 8 * c), acc);
      scores[g * len + j] = hsum(acc);
    }
  }
  const int64_t len8 = len & ~int64_t(7);
  bool bad[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * len;
    const float m = row_max(sg, len, bad[g]);
    if (bad[g]) {  // its output is NaN: keep the arithmetic below finite
      for (int64_t i = 0; i < len; ++i) sg[i] = 0.f;
      continue;
    }
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    for (int64_t i = 0; i < len8; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + i), mv));
      _mm256_storeu_ps(sg + i, e);
      sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (int64_t i = len8; i < len; ++i) {  // the tail through a padded lane block: same exp everywhere
      alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      t[0] = sg[i] - m;
      alignas(32) float e[8];
      _mm256_store_ps(e, exp8(_mm256_load_ps(t)));
      sg[i] = e[0];
      sum += e[0];
    }
    const float inv = 1.f / sum;
    const __m256 iv = _mm256_set1_ps(inv);
    for (int64_t i = 0; i < len8; i += 8) _mm256_storeu_ps(sg + i, _mm256_mul_ps(_mm256_loadu_ps(sg + i), iv));
    for (int64_t i = len8; i < len; ++i) sg[i] *= inv;
  }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t na = std::min<int64_t>(4, G - g0);
    for (int64_t c = 0; c < D8; c += 2) {
      if (c + 1 < D8)
        axpy2_heads<true>(na, scores + g0 * len, len, v + 8 * c, v_row, out + g0 * D + 8 * c, D);
      else
        axpy2_heads<false>(na, scores + g0 * len, len, v + 8 * c, v_row, out + g0 * D + 8 * c, D);
    }
  }
  poison_bad(bad, G, D, out);
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
bool cpu_has_avx2() { return false; }
#endif

// C2T_FAST_DECODE_PORTABLE=1 forces the portable loop (to test it on an AVX2 machine).
bool use_avx2() {
  static const bool ok = [] {
    const char* force = std::getenv("C2T_FAST_DECODE_PORTABLE");
    return cpu_has_avx2() && !(force != nullptr && std::string(force) == "1");
  }();
  return ok;
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths) {
  const char* op = "decode_attention";
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be [B, Hq, D], got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, op, ": k and v must be [B, Hkv, C, D], got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ",
                    v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, op, ": k must be [B, Hkv, C, D] = [", B, ", Hkv, C, ", D,
                    "], got ", k.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, op, ": Hq = ", Hq,
                    " must be a multiple of Hkv = ", Hkv, " with at most ", kMaxGroup, " query heads per KV head");
  TORCH_CHECK_VALUE(D >= 1 && D <= 256, op, ": head_dim must be in 1..256, got ", D);
  for (const at::Tensor* t : {&q, &k, &v, &lengths}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every input must be a CPU tensor, got ", t->device());
  }
  const auto kt = k.scalar_type();
  TORCH_CHECK_VALUE(kt == at::kFloat || kt == at::kBFloat16 || kt == at::kHalf, op,
                    ": k and v must be float32, bfloat16 or float16, got ", kt);
  TORCH_CHECK_VALUE(v.scalar_type() == kt, op, ": k and v must share a dtype, got ", kt, " and ", v.scalar_type());
  const auto qt = q.scalar_type();
  TORCH_CHECK_VALUE(qt == at::kFloat || qt == at::kBFloat16 || qt == at::kHalf, op,
                    ": q must be float32, bfloat16 or float16, got ", qt);
  TORCH_CHECK_VALUE(k.stride(3) == 1 && v.stride(3) == 1, op, ": k and v need unit stride along head_dim, got ",
                    k.strides(), " and ", v.strides());
  TORCH_CHECK_VALUE(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == B, op,
                    ": lengths must be int64 [B] = [", B, "], got ", lengths.scalar_type(), " ", lengths.sizes());
  const int64_t C = k.size(2);
  const at::Tensor lc = lengths.contiguous();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lp[b] >= 1 && lp[b] <= C, op, ": lengths[", b, "] = ", lp[b], " must be in 1..", C,
                      " (the cache's length)");
  }
}

template <typename T>
void run(const at::Tensor& qf, const at::Tensor& k, const at::Tensor& v, const int64_t* lens, double scale,
         at::Tensor& out) {
  const int64_t B = qf.size(0), Hq = qf.size(1), D = qf.size(2), Hkv = k.size(1), G = Hq / Hkv;
  const bool avx2 = use_avx2() && D % 8 == 0;
  if (!avx2) {
    TORCH_WARN_ONCE("c2t_fast::decode_attention: running its portable loop (",
                    use_avx2() ? "head_dim % 8 != 0" : "no AVX2/FMA/F16C or C2T_FAST_DECODE_PORTABLE=1",
                    "), several times slower than the AVX2 kernel");
  }
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, lens[b]);
  // Work is proportional to a row's length and rows differ by 10x or more: split the (row, head) tasks
  // into one contiguous chunk per thread of about equal total length (at::parallel_for alone would
  // give each thread as many rows, whatever their lengths).
  const int64_t n_tasks = B * Hkv;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  std::vector<int64_t> bounds(n_chunks + 1, n_tasks);
  bounds[0] = 0;
  {
    int64_t total = 0;
    for (int64_t t = 0; t < n_tasks; ++t) total += lens[t / Hkv];
    int64_t acc = 0, c = 1;
    for (int64_t t = 0; t < n_tasks && c < n_chunks; ++t) {
      acc += lens[t / Hkv];
      while (c < n_chunks && acc * n_chunks >= total * c) bounds[c++] = t + 1;
    }
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> scores(G * max_len), qs(G * D);
    for (int64_t t = bounds[chunk_begin]; t < bounds[chunk_end]; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv, len = lens[b];
      for (int64_t i = 0; i < G * D; ++i) qs[i] = static_cast<float>(qp[(b * Hq + h * G) * D + i] * scale);
      const T* kb = kp + b * k.stride(0) + h * k.stride(1);
      const T* vb = vp + b * v.stride(0) + h * v.stride(1);
      float* ob = op + (b * Hq + h * G) * D;
#if C2T_DECODE_X86
      if (avx2) {
        head_avx2<T>(qs.data(), G, kb, k.stride(2), vb, v.stride(2), len, D, scores.data(), ob);
        continue;
      }
#endif
      head_generic<T>(qs.data(), G, kb, k.stride(2), vb, v.stride(2), len, D, scores.data(), ob);
    }
  });
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& lengths, double scale) {
  check_args(q, k, v, lengths);
  TORCH_CHECK_VALUE(std::isfinite(scale), "decode_attention: scale must be finite, got ", scale);
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const at::Tensor lc = lengths.contiguous();
  const int64_t* lens = lc.data_ptr<int64_t>();
  switch (k.scalar_type()) {
    case at::kFloat: run<float>(qf, k, v, lens, scale, out); break;
    case at::kBFloat16: run<c10::BFloat16>(qf, k, v, lens, scale, out); break;
    default: run<c10::Half>(qf, k, v, lens, scale, out); break;
  }
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

}  // namespace c2t_fast

// Schema in ops.cpp.
TORCH_LIBRARY_IMPL(c2t_fast, CPU, m) { m.impl("decode_attention", &c2t_fast::decode_attention_cpu); }
