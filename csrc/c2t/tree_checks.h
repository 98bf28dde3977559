// Device-agnostic argument checks shared by the CPU and CUDA bindings of the tree ops.
// Every check runs before anything is allocated or written, so a bad call changes nothing.
#pragma once

#include <torch/types.h>

namespace c2t_fast {

inline void check_vec(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                    t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ",
                    name_b, " is on ", b.device(), "; all inputs must be on one device");
}

inline void check_tree_args(const at::Tensor& tokens, const at::Tensor& parents, const char* op) {
  check_vec(tokens, op, "tokens", at::kLong);
  check_vec(parents, op, "parents", at::kInt);
  TORCH_CHECK_VALUE(tokens.numel() == parents.numel(), op, ": tokens has ", tokens.numel(),
                    " nodes but parents has ", parents.numel());
  TORCH_CHECK_VALUE(parents.numel() >= 1, op, ": the tree needs at least the root node");
  check_same_device(tokens, parents, op, "tokens", "parents");
}

inline void check_rows(const at::Tensor& x, int64_t T, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == T, op, ": ", name, " must be [T, V] with T = ", T,
                    " tree nodes, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": ", name, " has an empty vocabulary dimension");
}

// prune_tree: shapes, dtypes and devices of the tree and candidate arrays (contents are checked by
// the kernels, which read them).
inline void check_prune_args(const at::Tensor& tree_tokens, const at::Tensor& tree_parents,
                             const at::Tensor& tree_logp, const at::Tensor& cand_parent,
                             const at::Tensor& cand_token, const at::Tensor& cand_logp,
                             const at::Tensor& cand_conf, const at::Tensor& cand_keep) {
  const char* op = "prune_tree";
  check_tree_args(tree_tokens, tree_parents, op);
  check_vec(tree_logp, op, "tree_logp", at::kFloat);
  TORCH_CHECK_VALUE(tree_logp.numel() == tree_tokens.numel(), op, ": tree_logp has ", tree_logp.numel(),
                    " entries for ", tree_tokens.numel(), " nodes");
  check_vec(cand_parent, op, "cand_parent", at::kLong);
  check_vec(cand_token, op, "cand_token", at::kLong);
  check_vec(cand_logp, op, "cand_logp", at::kFloat);
  check_vec(cand_conf, op, "cand_conf", at::kFloat);
  check_vec(cand_keep, op, "cand_keep", at::kBool);
  const int64_t N = cand_parent.numel();
  for (const at::Tensor* t : {&cand_token, &cand_logp, &cand_conf, &cand_keep}) {
    TORCH_CHECK_VALUE(t->numel() == N, op, ": all candidate arrays need ", N,
                      " entries (as cand_parent), got one with ", t->numel());
  }
  for (const at::Tensor* t : {&tree_logp, &cand_parent, &cand_token, &cand_logp, &cand_conf, &cand_keep}) {
    check_same_device(*t, tree_tokens, op, "a candidate or tree array", "tree_tokens");
  }
}

inline void check_rerank_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logp,
                              int64_t total_tokens) {
  const char* op = "rerank_tree";
  check_tree_args(tokens, parents, op);
  check_vec(logp, op, "logp", at::kFloat);
  check_same_device(tokens, logp, op, "tokens", "logp");
  TORCH_CHECK_VALUE(logp.numel() == tokens.numel(), op, ": logp has ", logp.numel(), " entries for ",
                    tokens.numel(), " nodes");
  TORCH_CHECK_VALUE(total_tokens >= 1, op, ": total_tokens counts the root and must be >= 1, got ",
                    total_tokens);
}

// verify_greedy's target: int64 argmax ids [T] or floating logits [T, V].
inline void check_greedy_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target) {
  const char* op = "verify_greedy";
  check_tree_args(tokens, parents, op);
  check_same_device(tokens, target, op, "tokens", "target");
  const int64_t T = tokens.numel();
  if (target.scalar_type() == at::kLong) {
    check_vec(target, op, "target (argmax ids)", at::kLong);
    TORCH_CHECK_VALUE(target.numel() == T, op, ": target argmax has ", target.numel(), " entries for ", T,
                      " nodes");
  } else {
    TORCH_CHECK_VALUE(at::isFloatingType(target.scalar_type()), op,
                      ": target must be int64 argmax ids [T] or floating logits [T, V], got ",
                      target.scalar_type());
    check_rows(target, T, op, "target logits");
  }
}

inline void check_sample_args(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& probs,
                              const at::Tensor& uniforms) {
  const char* op = "verify_sample";
  check_tree_args(tokens, parents, op);
  const int64_t T = tokens.numel();
  TORCH_CHECK_VALUE(at::isFloatingType(probs.scalar_type()), op, ": probs must be floating point, got ",
                    probs.scalar_type());
  check_rows(probs, T, op, "probs");
  check_vec(uniforms, op, "uniforms", at::kDouble);
  TORCH_CHECK_VALUE(uniforms.numel() == T, op, ": uniforms needs one draw per node (", T,
                    "; slot 0 draws the bonus token), got ", uniforms.numel());
  check_same_device(tokens, probs, op, "tokens", "probs");
  check_same_device(tokens, uniforms, op, "tokens", "uniforms");
}

// The error for the first invalid entry of a parents array (shared so CPU and CUDA say the same).
[[noreturn]] inline void fail_bad_parent(const char* op, int64_t i, int64_t value) {
  if (i == 0) {
    TORCH_CHECK_VALUE(false, op, ": node 0 must be the root (parents[0] == -1), got parents[0] = ",
                      value);
  }
  TORCH_CHECK_VALUE(false, op, ": parents[", i, "] = ", value,
                    " is invalid; every non-root node needs a parent with a smaller index "
                    "(topological order, root at node 0, no cycles)");
  __builtin_unreachable();
}

}  // namespace c2t_fast
