// Torch-free launchers of the CUDA tree kernels (raw pointers + stream). The torch-facing side is
// tree_ops_cuda.cpp. Trees are small, so most kernels run as one block that walks the tree.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace c2t_fast {
namespace cuda {

constexpr int32_t kNoBadNode = 0x7fffffff;
// Element types for the kernels that read model outputs.
enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// meta (device int32[4]): {first invalid parent index or kNoBadNode, num_leaves, max_depth, 0}.
// leaves and scratch have capacity T.
cudaError_t build_tree(const int32_t* parents, int32_t T, int64_t prefix_len, int32_t* depth,
                       int64_t* bits, int64_t* position_ids, int64_t* leaves, int32_t* scratch,
                       int32_t* meta, cudaStream_t stream);
// retrieve: [L, width], width = max_depth + 1.
cudaError_t build_retrieve(const int32_t* parents, const int32_t* depth, const int64_t* leaves,
                           int32_t L, int32_t width, int64_t* retrieve, cudaStream_t stream);

// meta: {first invalid tree parent, first candidate with an out-of-range parent, count, 0}.
// selected and flags (scratch) have capacity N.
cudaError_t prune_select(const int32_t* tree_parents, int32_t T, const int64_t* cand_parent,
                         const float* conf, const bool* keep, int32_t N, int64_t max_keep,
                         int64_t* selected, int32_t* flags, int32_t* meta, cudaStream_t stream);

// meta: {first invalid parent, count, 0, 0}. order/chosen are scratch of capacity T; selected and
// new_parents have capacity T.
cudaError_t rerank_select(const int32_t* parents, const float* logp, int32_t T, int64_t total,
                          int32_t* order, uint8_t* chosen, int64_t* selected, int32_t* new_parents,
                          int32_t* meta, cudaStream_t stream);

// Row-wise argmax with torch.argmax's conventions (first maximum, NaN is the maximum).
cudaError_t argmax_rows(const void* logits, DType dtype, int64_t rows, int64_t V, int64_t row_stride,
                        int64_t* out, cudaStream_t stream);

// path capacity T; out = {path length, bonus}; meta = {first invalid parent, ...}.
cudaError_t verify_greedy(const int64_t* tokens, const int32_t* parents, const int64_t* pred,
                          int32_t T, int64_t* path, int64_t* out, int32_t* meta, cudaStream_t stream);

// probs [T, V] with row stride; uniforms float64[T]; rejected is scratch of capacity T.
// meta = {first invalid parent, first node whose token is outside [0, V), ...}.
cudaError_t verify_sample(const int64_t* tokens, const int32_t* parents, const void* probs,
                          DType dtype, int32_t T, int64_t V, int64_t row_stride,
                          const double* uniforms, int64_t* path, int64_t* out, int64_t* rejected,
                          int32_t* meta, cudaStream_t stream);

// Moves rows prefix_len + accepted[i] -> prefix_len + i of every [B, H, S, D] cache, in place.
// Strides are in elements; every tensor has D contiguous elements of `elem_size` bytes.
cudaError_t compact_kv(void* const* ptrs, const int64_t* stride_b, const int64_t* stride_h,
                       const int64_t* stride_s, int32_t n_tensors, int64_t B, int64_t H, int64_t D,
                       int32_t elem_size, int64_t prefix_len, const int64_t* accepted, int64_t n,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace c2t_fast
