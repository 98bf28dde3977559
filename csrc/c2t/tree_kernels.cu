// CUDA kernels of the token-tree ops. Torch-free: raw pointers and a stream.
//
// Trees hold at most a few thousand nodes, so the bookkeeping kernels run as a single block: the
// per-node work (ancestor walks, ranks) is spread over the block, and the few inherently serial
// steps (compaction in index order, the greedy closed top-N, the sampling walk) run on thread 0.
// No floating-point atomics anywhere: results are deterministic.
#include "tree_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

namespace c2t_fast {
namespace cuda {
namespace {

constexpr int kBlock = 1024;

__device__ void find_bad_parent(const int32_t* p, int32_t T, int32_t* bad) {
  for (int32_t i = threadIdx.x; i < T; i += blockDim.x) {
    const bool ok = i == 0 ? p[0] == -1 : (p[i] >= 0 && p[i] < i);
    if (!ok) atomicMin(bad, i);
  }
}

// Block-wide validation of the parents array, shared by the single-block kernels: on failure every
// thread returns false and thread 0 records the first bad node in meta[0].
__device__ bool parents_valid(const int32_t* p, int32_t T, int32_t* bad, int32_t* meta) {
  if (threadIdx.x == 0) *bad = kNoBadNode;
  __syncthreads();
  find_bad_parent(p, T, bad);
  __syncthreads();
  if (*bad != kNoBadNode) {
    if (threadIdx.x == 0) meta[0] = *bad;
    return false;
  }
  return true;
}

__global__ void build_tree_kernel(const int32_t* __restrict__ p, int32_t T, int64_t prefix_len,
                                  int32_t* depth, int64_t* bits, int64_t* pos, int64_t* leaves,
                                  int32_t* has_child, int32_t* meta) {
  __shared__ int32_t bad, max_depth;
  if (threadIdx.x == 0) max_depth = 0;
  for (int32_t i = threadIdx.x; i < T; i += blockDim.x) has_child[i] = 0;
  if (!parents_valid(p, T, &bad, meta)) return;
  const int32_t W = (T + 63) / 64;
  for (int32_t i = threadIdx.x; i < T; i += blockDim.x) {
    if (i > 0) has_child[p[i]] = 1;
    unsigned long long* row = reinterpret_cast<unsigned long long*>(bits + int64_t(i) * W);
    for (int32_t w = 0; w < W; ++w) row[w] = 0ull;
    int32_t d = -1;
    for (int32_t j = i; j != -1; j = p[j]) {
      row[j / 64] |= 1ull << (j % 64);
      ++d;
    }
    depth[i] = d;
    pos[i] = prefix_len + d;
    atomicMax(&max_depth, d);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t L = 0;
    for (int32_t i = 0; i < T; ++i)
      if (!has_child[i]) leaves[L++] = i;
    meta[0] = kNoBadNode;
    meta[1] = L;
    meta[2] = max_depth;
  }
}

__global__ void retrieve_kernel(const int32_t* __restrict__ p, const int32_t* __restrict__ depth,
                                const int64_t* __restrict__ leaves, int32_t L, int32_t width,
                                int64_t* retrieve) {
  const int32_t l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= L) return;
  int64_t* row = retrieve + int64_t(l) * width;
  const int32_t leaf = static_cast<int32_t>(leaves[l]);
  for (int32_t c = depth[leaf] + 1; c < width; ++c) row[c] = -1;
  for (int32_t j = leaf; j != -1; j = p[j]) row[depth[j]] = j;
}

// (score desc, index asc), NaN last.
__device__ __forceinline__ bool ranks_before(float sa, int32_t a, float sb, int32_t b) {
  sa = isnan(sa) ? -INFINITY : sa;
  sb = isnan(sb) ? -INFINITY : sb;
  return sa > sb || (sa == sb && a < b);
}

__global__ void prune_kernel(const int32_t* __restrict__ tree_parents, int32_t T,
                             const int64_t* __restrict__ cand_parent, const float* __restrict__ conf,
                             const bool* __restrict__ keep, int32_t N, int64_t max_keep,
                             int64_t* selected, int32_t* flags, int32_t* meta) {
  __shared__ int32_t bad_tree, bad_cand;
  if (threadIdx.x == 0) {
    bad_tree = kNoBadNode;
    bad_cand = kNoBadNode;
  }
  __syncthreads();
  find_bad_parent(tree_parents, T, &bad_tree);
  for (int32_t i = threadIdx.x; i < N; i += blockDim.x)
    if (cand_parent[i] < 0 || cand_parent[i] >= T) atomicMin(&bad_cand, i);
  __syncthreads();
  if (bad_tree != kNoBadNode || bad_cand != kNoBadNode) {
    if (threadIdx.x == 0) {
      meta[0] = bad_tree;
      meta[1] = bad_cand;
      meta[2] = 0;
    }
    return;
  }
  for (int32_t i = threadIdx.x; i < N; i += blockDim.x) {
    int32_t take = keep[i];
    if (take && max_keep >= 0) {
      int64_t rank = 0;
      for (int32_t j = 0; j < N; ++j) rank += (keep[j] && ranks_before(conf[j], j, conf[i], i));
      take = rank < max_keep;
    }
    flags[i] = take;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t n = 0;
    for (int32_t i = 0; i < N; ++i)
      if (flags[i]) selected[n++] = i;
    meta[0] = kNoBadNode;
    meta[1] = kNoBadNode;
    meta[2] = n;
  }
}

__global__ void rerank_kernel(const int32_t* __restrict__ p, const float* __restrict__ logp,
                              int32_t T, int64_t total, int32_t* order, uint8_t* chosen,
                              int64_t* selected, int32_t* new_parents, int32_t* meta) {
  __shared__ int32_t bad;
  if (!parents_valid(p, T, &bad, meta)) return;
  // order[rank] = node over the non-root nodes; rank by counting is O(T^2 / threads).
  for (int32_t i = 1 + threadIdx.x; i < T; i += blockDim.x) {
    int32_t rank = 0;
    for (int32_t j = 1; j < T; ++j) rank += ranks_before(logp[j], j, logp[i], i);
    order[rank] = i;
    chosen[i] = 0;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  chosen[0] = 1;
  int64_t count = 1;
  for (int32_t r = 0; r < T - 1 && count < total; ++r) {
    const int32_t idx = order[r];
    if (chosen[idx]) continue;
    int64_t missing = 0;
    for (int32_t j = idx; j != -1 && !chosen[j]; j = p[j]) ++missing;
    if (count + missing > total) continue;
    for (int32_t j = idx; j != -1 && !chosen[j]; j = p[j]) chosen[j] = 1;
    count += missing;
  }
  // Renumber: order[] is no longer needed, reuse it as the old -> new index map.
  int32_t k = 0;
  for (int32_t i = 0; i < T; ++i) {
    if (!chosen[i]) continue;
    order[i] = k;
    selected[k] = i;
    new_parents[k] = i == 0 ? -1 : order[p[i]];
    ++k;
  }
  meta[0] = kNoBadNode;
  meta[1] = k;
}

template <typename T>
__device__ __forceinline__ double load(const T* x, int64_t i) {
  return static_cast<double>(x[i]);
}
template <>
__device__ __forceinline__ double load<__half>(const __half* x, int64_t i) {
  return static_cast<double>(__half2float(x[i]));
}
template <>
__device__ __forceinline__ double load<__nv_bfloat16>(const __nv_bfloat16* x, int64_t i) {
  return static_cast<double>(__bfloat162float(x[i]));
}

// torch.argmax order: NaN is the maximum, then larger value, then lower index.
__device__ __forceinline__ bool argmax_better(double va, int64_t ia, double vb, int64_t ib) {
  const bool an = isnan(va), bn = isnan(vb);
  if (an != bn) return an;
  if (!an && va != vb) return va > vb;
  return ia < ib;
}

template <typename T>
__global__ void argmax_kernel(const T* __restrict__ x, int64_t V, int64_t stride, int64_t* out) {
  __shared__ double sv[256];
  __shared__ int64_t si[256];
  const T* row = x + blockIdx.x * stride;
  double bv = NAN;
  int64_t bi = -1;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const double xv = load(row, v);
    if (bi < 0 || argmax_better(xv, v, bv, bi)) {
      bv = xv;
      bi = v;
    }
  }
  sv[threadIdx.x] = bv;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const int o = threadIdx.x + s;
      if (si[o] >= 0 && (si[threadIdx.x] < 0 || argmax_better(sv[o], si[o], sv[threadIdx.x], si[threadIdx.x]))) {
        sv[threadIdx.x] = sv[o];
        si[threadIdx.x] = si[o];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = si[0];
}

__global__ void verify_greedy_kernel(const int64_t* __restrict__ tok, const int32_t* __restrict__ p,
                                     const int64_t* __restrict__ pred, int32_t T, int64_t* path,
                                     int64_t* out, int32_t* meta) {
  __shared__ int32_t bad;
  __shared__ unsigned long long best;
  if (threadIdx.x == 0) best = 0ull;
  if (!parents_valid(p, T, &bad, meta)) return;
  // Node i is accepted iff every node on its path matches the argmax of its parent's logits.
  // Key: deeper first, then lower index.
  for (int32_t i = threadIdx.x; i < T; i += blockDim.x) {
    bool ok = true;
    unsigned long long d = 0;
    for (int32_t j = i; j > 0; j = p[j]) {
      ok = ok && tok[j] == pred[p[j]];
      ++d;
    }
    if (ok) atomicMax(&best, (d << 32) | static_cast<unsigned long long>(kNoBadNode - i));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int32_t node = kNoBadNode - static_cast<int32_t>(best & 0xffffffffull);
    int64_t d = static_cast<int64_t>(best >> 32);
    out[0] = d + 1;
    out[1] = pred[node];
    for (int32_t j = node; j != -1; j = p[j]) path[d--] = j;
    meta[0] = kNoBadNode;
  }
}

template <typename T>
__device__ double block_row_sum(const T* row, int64_t V, double* red) {
  double s = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += load(row, v);
  red[threadIdx.x] = s;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int t = 0; t < blockDim.x; ++t) total += red[t];  // fixed order: deterministic
  __syncthreads();
  return total;  // valid on thread 0 only
}

__device__ __forceinline__ bool is_rejected(const int64_t* rej, int32_t R, int64_t v) {
  for (int32_t r = 0; r < R; ++r)
    if (rej[r] == v) return true;
  return false;
}

template <typename T>
__global__ void verify_sample_kernel(const int64_t* __restrict__ tok, const int32_t* __restrict__ p,
                                     const T* __restrict__ probs, int32_t Tn, int64_t V,
                                     int64_t stride, const double* __restrict__ u, int64_t* path,
                                     int64_t* out, int64_t* rejected, int32_t* meta) {
  __shared__ double red[256];
  __shared__ int64_t last_pos[256];
  __shared__ int32_t bad, bad_tok, next, R, depth;
  __shared__ double mass;
  if (threadIdx.x == 0) {
    bad = kNoBadNode;
    bad_tok = kNoBadNode;
  }
  __syncthreads();
  find_bad_parent(p, Tn, &bad);
  for (int32_t i = 1 + threadIdx.x; i < Tn; i += blockDim.x)
    if (tok[i] < 0 || tok[i] >= V) atomicMin(&bad_tok, i);
  __syncthreads();
  if (bad != kNoBadNode || bad_tok != kNoBadNode) {
    if (threadIdx.x == 0) {
      meta[0] = bad;
      meta[1] = bad_tok;
    }
    return;
  }
  int32_t cur = 0;
  if (threadIdx.x == 0) {
    path[0] = 0;
    depth = 0;
  }
  while (true) {
    const T* row = probs + cur * stride;
    const double total = block_row_sum(row, V, red);
    if (threadIdx.x == 0) {
      double m = total;
      int32_t r = 0, nxt = -1;
      for (int32_t c = cur + 1; c < Tn; ++c) {  // children of cur, in index order
        if (p[c] != cur) continue;
        const int64_t x = tok[c];
        const bool seen = is_rejected(rejected, r, x);
        const double px = seen ? 0.0 : load(row, x);
        if (u[c] * m < px) {
          nxt = c;
          break;
        }
        if (!seen) {
          m -= px;
          rejected[r++] = x;
        }
      }
      mass = m;
      R = r;
      next = nxt;
      if (nxt >= 0) path[++depth] = nxt;
    }
    __syncthreads();
    if (next < 0) break;
    cur = next;
    __syncthreads();
  }
  // Bonus: inverse CDF over the residual. Threads own contiguous chunks so the scan keeps index order.
  const T* row = probs + cur * stride;
  const int64_t chunk = (V + blockDim.x - 1) / blockDim.x;
  const int64_t lo = threadIdx.x * chunk, hi = min(V, lo + chunk);
  double s = 0.0;
  int64_t lp = -1;
  for (int64_t v = lo; v < hi; ++v) {
    const double pv = load(row, v);
    if (pv <= 0.0 || is_rejected(rejected, R, v)) continue;
    s += pv;
    lp = v;
  }
  red[threadIdx.x] = s;
  last_pos[threadIdx.x] = lp;
  __syncthreads();
  if (threadIdx.x == 0) {
    const double target = u[0] * mass;
    double acc = 0.0;
    int64_t bonus = -1, lastp = -1;
    for (int t = 0; t < blockDim.x && bonus < 0; ++t) {
      if (last_pos[t] >= 0) lastp = last_pos[t];
      if (acc + red[t] > target) {
        const int64_t tlo = t * chunk, thi = min(V, tlo + chunk);
        for (int64_t v = tlo; v < thi; ++v) {
          const double pv = load(row, v);
          if (pv <= 0.0 || is_rejected(rejected, R, v)) continue;
          acc += pv;
          if (acc > target) {
            bonus = v;
            break;
          }
        }
      } else {
        acc += red[t];
      }
    }
    if (bonus < 0) bonus = lastp >= 0 ? lastp : 0;
    out[0] = depth + 1;
    out[1] = bonus;
    meta[0] = kNoBadNode;
    meta[1] = kNoBadNode;
  }
}

constexpr int kMaxTensorsPerLaunch = 32;

struct CompactArgs {
  void* ptr[kMaxTensorsPerLaunch];
  int64_t sb[kMaxTensorsPerLaunch], sh[kMaxTensorsPerLaunch], ss[kMaxTensorsPerLaunch];
};

// One thread per (b, h, d) column of one tensor; it moves that column's n rows in increasing
// order, which is safe in place because accepted[i] >= i.
template <typename E>
__global__ void compact_kernel(CompactArgs args, int64_t B, int64_t H, int64_t D, int64_t prefix_len,
                               const int64_t* __restrict__ accepted, int64_t n) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= B * H * D) return;
  const int t = blockIdx.y;
  const int64_t d = col % D, h = (col / D) % H, b = col / (D * H);
  E* base = static_cast<E*>(args.ptr[t]) + b * args.sb[t] + h * args.sh[t] + d;
  const int64_t ss = args.ss[t];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = accepted[i];
    if (a != i) base[(prefix_len + i) * ss] = base[(prefix_len + a) * ss];
  }
}

}  // namespace

cudaError_t build_tree(const int32_t* parents, int32_t T, int64_t prefix_len, int32_t* depth,
                       int64_t* bits, int64_t* position_ids, int64_t* leaves, int32_t* scratch,
                       int32_t* meta, cudaStream_t stream) {
  build_tree_kernel<<<1, kBlock, 0, stream>>>(parents, T, prefix_len, depth, bits, position_ids,
                                              leaves, scratch, meta);
  return cudaGetLastError();
}

cudaError_t build_retrieve(const int32_t* parents, const int32_t* depth, const int64_t* leaves,
                           int32_t L, int32_t width, int64_t* retrieve, cudaStream_t stream) {
  if (L == 0) return cudaSuccess;
  retrieve_kernel<<<(L + 255) / 256, 256, 0, stream>>>(parents, depth, leaves, L, width, retrieve);
  return cudaGetLastError();
}

cudaError_t prune_select(const int32_t* tree_parents, int32_t T, const int64_t* cand_parent,
                         const float* conf, const bool* keep, int32_t N, int64_t max_keep,
                         int64_t* selected, int32_t* flags, int32_t* meta, cudaStream_t stream) {
  prune_kernel<<<1, kBlock, 0, stream>>>(tree_parents, T, cand_parent, conf, keep, N, max_keep,
                                         selected, flags, meta);
  return cudaGetLastError();
}

cudaError_t rerank_select(const int32_t* parents, const float* logp, int32_t T, int64_t total,
                          int32_t* order, uint8_t* chosen, int64_t* selected, int32_t* new_parents,
                          int32_t* meta, cudaStream_t stream) {
  rerank_kernel<<<1, kBlock, 0, stream>>>(parents, logp, T, total, order, chosen, selected,
                                          new_parents, meta);
  return cudaGetLastError();
}

cudaError_t argmax_rows(const void* logits, DType dtype, int64_t rows, int64_t V, int64_t row_stride,
                        int64_t* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case kF32: argmax_kernel<<<rows, 256, 0, stream>>>(static_cast<const float*>(logits), V, row_stride, out); break;
    case kF16: argmax_kernel<<<rows, 256, 0, stream>>>(static_cast<const __half*>(logits), V, row_stride, out); break;
    case kBF16: argmax_kernel<<<rows, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(logits), V, row_stride, out); break;
    case kF64: argmax_kernel<<<rows, 256, 0, stream>>>(static_cast<const double*>(logits), V, row_stride, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t verify_greedy(const int64_t* tokens, const int32_t* parents, const int64_t* pred,
                          int32_t T, int64_t* path, int64_t* out, int32_t* meta, cudaStream_t stream) {
  verify_greedy_kernel<<<1, kBlock, 0, stream>>>(tokens, parents, pred, T, path, out, meta);
  return cudaGetLastError();
}

cudaError_t verify_sample(const int64_t* tokens, const int32_t* parents, const void* probs,
                          DType dtype, int32_t T, int64_t V, int64_t row_stride,
                          const double* uniforms, int64_t* path, int64_t* out, int64_t* rejected,
                          int32_t* meta, cudaStream_t stream) {
  switch (dtype) {
    case kF32: verify_sample_kernel<<<1, 256, 0, stream>>>(tokens, parents, static_cast<const float*>(probs), T, V, row_stride, uniforms, path, out, rejected, meta); break;
    case kF16: verify_sample_kernel<<<1, 256, 0, stream>>>(tokens, parents, static_cast<const __half*>(probs), T, V, row_stride, uniforms, path, out, rejected, meta); break;
    case kBF16: verify_sample_kernel<<<1, 256, 0, stream>>>(tokens, parents, static_cast<const __nv_bfloat16*>(probs), T, V, row_stride, uniforms, path, out, rejected, meta); break;
    case kF64: verify_sample_kernel<<<1, 256, 0, stream>>>(tokens, parents, static_cast<const double*>(probs), T, V, row_stride, uniforms, path, out, rejected, meta); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t compact_kv(void* const* ptrs, const int64_t* stride_b, const int64_t* stride_h,
                       const int64_t* stride_s, int32_t n_tensors, int64_t B, int64_t H, int64_t D,
                       int32_t elem_size, int64_t prefix_len, const int64_t* accepted, int64_t n,
                       cudaStream_t stream) {
  const int64_t cols = B * H * D;
  if (n == 0 || cols == 0) return cudaSuccess;
  for (int32_t first = 0; first < n_tensors; first += kMaxTensorsPerLaunch) {
    const int32_t count = min(kMaxTensorsPerLaunch, n_tensors - first);
    CompactArgs args;
    for (int32_t t = 0; t < count; ++t) {
      args.ptr[t] = ptrs[first + t];
      args.sb[t] = stride_b[first + t];
      args.sh[t] = stride_h[first + t];
      args.ss[t] = stride_s[first + t];
    }
    const dim3 grid((cols + 255) / 256, count);
    switch (elem_size) {
      case 1: compact_kernel<uint8_t><<<grid, 256, 0, stream>>>(args, B, H, D, prefix_len, accepted, n); break;
      case 2: compact_kernel<uint16_t><<<grid, 256, 0, stream>>>(args, B, H, D, prefix_len, accepted, n); break;
      case 4: compact_kernel<uint32_t><<<grid, 256, 0, stream>>>(args, B, H, D, prefix_len, accepted, n); break;
      case 8: compact_kernel<uint64_t><<<grid, 256, 0, stream>>>(args, B, H, D, prefix_len, accepted, n); break;
      default: return cudaErrorInvalidValue;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace c2t_fast
