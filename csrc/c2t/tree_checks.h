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
