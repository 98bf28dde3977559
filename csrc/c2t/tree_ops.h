// Token-tree ops of c2t_fast: shared declarations of the CPU kernels (torch-facing).
// Tree layout (see DESIGN.md): T nodes in topological order, parents[0] == -1, 0 <= parents[i] < i.
#pragma once

#include <torch/types.h>

#include <tuple>
#include <vector>

namespace c2t_fast {

// Validates parents (int32[T]) and returns a clear ValueError naming the first bad node.
void check_parents(const at::Tensor& parents, const char* op);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree_cpu(
    const at::Tensor& parents, int64_t prefix_len);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_tree_cpu(
    const at::Tensor& tree_tokens, const at::Tensor& tree_parents, const at::Tensor& tree_logp,
    const at::Tensor& cand_parent, const at::Tensor& cand_token, const at::Tensor& cand_logp,
    const at::Tensor& cand_conf, const at::Tensor& cand_keep, int64_t max_keep);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rerank_tree_cpu(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logp,
    int64_t total_tokens);

std::tuple<at::Tensor, at::Tensor> verify_greedy_cpu(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target);

std::tuple<at::Tensor, at::Tensor> verify_sample_cpu(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& probs,
    const at::Tensor& uniforms);

// Checks caches/accepted (accepted already readable on the host as `acc`).
void check_compact_args(at::TensorList caches, int64_t prefix_len, const at::Tensor& accepted,
                        const int64_t* acc);

void compact_kv_cpu(at::TensorList caches, int64_t prefix_len, const at::Tensor& accepted);

}  // namespace c2t_fast
