// Torch-facing side of the CUDA tree kernels: argument checks, allocation, the one host read of
// data-dependent sizes, and error reporting identical to the CPU kernels. Built only with CUDA.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "tree_checks.h"
#include "tree_ops.h"
#include "tree_kernels.h"

namespace c2t_fast {
namespace {

using cuda::kNoBadNode;

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

cuda::DType dtype_code(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::kF32;
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    case at::kDouble: return cuda::kF64;
    default: TORCH_CHECK_VALUE(false, op, ": unsupported floating dtype ", t);
  }
}

// Raises the CPU kernels' error for the first bad parent found on the device.
void raise_if_bad_parent(int32_t bad, const at::Tensor& parents, const char* op) {
  if (bad == kNoBadNode) return;
  fail_bad_parent(op, bad, parents[bad].item<int32_t>());
}

std::vector<int32_t> read_meta(const at::Tensor& meta) {
  at::Tensor h = meta.cpu();
  return std::vector<int32_t>(h.data_ptr<int32_t>(), h.data_ptr<int32_t>() + h.numel());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree_cuda(
    const at::Tensor& parents_in, int64_t prefix_len) {
  const char* op = "build_tree";
  check_vec(parents_in, op, "parents", at::kInt);
  check_on_cuda(parents_in, op, "parents");
  check_prefix_len(prefix_len, parents_in.numel(), op);
  const c10::cuda::CUDAGuard guard(parents_in.device());
  const at::Tensor parents = parents_in.contiguous();
  const int64_t T = parents.numel();
  TORCH_CHECK_VALUE(T >= 1, op, ": parents is empty; the tree needs at least the root node");
  const int64_t W = (T + 63) / 64;
  auto i32 = parents.options();
  auto i64 = parents.options().dtype(at::kLong);
  at::Tensor depth = at::empty({T}, i32), bits = at::empty({T, W}, i64), pos = at::empty({T}, i64);
  at::Tensor leaves = at::empty({T}, i64), scratch = at::empty({T}, i32), meta = at::zeros({4}, i32);
  check_cuda(cuda::build_tree(parents.data_ptr<int32_t>(), static_cast<int32_t>(T), prefix_len,
                              depth.data_ptr<int32_t>(), bits.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
                              leaves.data_ptr<int64_t>(), scratch.data_ptr<int32_t>(),
                              meta.data_ptr<int32_t>(), stream()),
             op);
  const std::vector<int32_t> m = read_meta(meta);
  raise_if_bad_parent(m[0], parents, op);
  const int32_t L = m[1], width = m[2] + 1;
  at::Tensor retrieve = at::empty({L, width}, i64);
  check_cuda(cuda::build_retrieve(parents.data_ptr<int32_t>(), depth.data_ptr<int32_t>(),
                                  leaves.data_ptr<int64_t>(), L, width, retrieve.data_ptr<int64_t>(),
                                  stream()),
             op);
  return {depth, bits, pos, retrieve, leaves.narrow(0, 0, L)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_tree_cuda(
    const at::Tensor& tree_tokens, const at::Tensor& tree_parents, const at::Tensor& tree_logp,
    const at::Tensor& cand_parent, const at::Tensor& cand_token, const at::Tensor& cand_logp,
    const at::Tensor& cand_conf, const at::Tensor& cand_keep, int64_t max_keep) {
  const char* op = "prune_tree";
  check_prune_args(tree_tokens, tree_parents, tree_logp, cand_parent, cand_token, cand_logp, cand_conf,
                   cand_keep);
  const int64_t T = tree_tokens.numel(), N = cand_parent.numel();
  const c10::cuda::CUDAGuard guard(tree_tokens.device());
  const at::Tensor par = tree_parents.contiguous(), cp = cand_parent.contiguous();
  const at::Tensor conf = cand_conf.contiguous(), keep = cand_keep.contiguous();
  at::Tensor selected = at::empty({std::max<int64_t>(N, 1)}, cp.options());
  at::Tensor flags = at::empty({std::max<int64_t>(N, 1)}, par.options());
  at::Tensor meta = at::zeros({4}, par.options());
  check_cuda(cuda::prune_select(par.data_ptr<int32_t>(), static_cast<int32_t>(T), cp.data_ptr<int64_t>(),
                                conf.data_ptr<float>(), keep.data_ptr<bool>(), static_cast<int32_t>(N),
                                max_keep, selected.data_ptr<int64_t>(), flags.data_ptr<int32_t>(),
                                meta.data_ptr<int32_t>(), stream()),
             op);
  const std::vector<int32_t> m = read_meta(meta);
  raise_if_bad_parent(m[0], par, op);
  TORCH_CHECK_VALUE(m[1] == kNoBadNode, op, ": cand_parent[", m[1], "] = ",
                    m[1] == kNoBadNode ? 0 : cp[m[1]].item<int64_t>(), " is not a node of the ", T,
                    "-node tree");
  const int64_t n = m[2];
  selected = selected.narrow(0, 0, n);
  return {at::cat({tree_tokens, cand_token.index_select(0, selected)}),
          at::cat({tree_parents, cand_parent.index_select(0, selected).to(at::kInt)}),
          at::cat({tree_logp, cand_logp.index_select(0, selected)}),
          at::arange(T, T + n, cp.options()), selected};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rerank_tree_cuda(
    const at::Tensor& tokens, const at::Tensor& parents_in, const at::Tensor& logp_in,
    int64_t total_tokens) {
  const char* op = "rerank_tree";
  check_rerank_args(tokens, parents_in, logp_in, total_tokens);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor parents = parents_in.contiguous(), logp = logp_in.contiguous();
  const int64_t T = tokens.numel();
  auto i32 = parents.options();
  at::Tensor order = at::empty({T}, i32), chosen = at::empty({T}, i32.dtype(at::kByte));
  at::Tensor selected = at::empty({T}, i32.dtype(at::kLong)), new_parents = at::empty({T}, i32);
  at::Tensor meta = at::zeros({4}, i32);
  check_cuda(cuda::rerank_select(parents.data_ptr<int32_t>(), logp.data_ptr<float>(),
                                 static_cast<int32_t>(T), total_tokens, order.data_ptr<int32_t>(),
                                 chosen.data_ptr<uint8_t>(), selected.data_ptr<int64_t>(),
                                 new_parents.data_ptr<int32_t>(), meta.data_ptr<int32_t>(), stream()),
             op);
  const std::vector<int32_t> m = read_meta(meta);
  raise_if_bad_parent(m[0], parents, op);
  selected = selected.narrow(0, 0, m[1]);
  return {tokens.index_select(0, selected), new_parents.narrow(0, 0, m[1]),
          logp_in.index_select(0, selected), selected};
}

std::tuple<at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& tokens_in,
                                                      const at::Tensor& parents_in,
                                                      const at::Tensor& target) {
  const char* op = "verify_greedy";
  check_greedy_args(tokens_in, parents_in, target);
  const int64_t T = tokens_in.numel();
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  at::Tensor pred;
  if (target.scalar_type() == at::kLong) {
    pred = target.contiguous();
  } else {
    const at::Tensor logits = target.stride(1) == 1 ? target : target.contiguous();
    pred = at::empty({T}, tokens_in.options());
    check_cuda(cuda::argmax_rows(logits.data_ptr(), dtype_code(logits.scalar_type(), op), T,
                                 logits.size(1), logits.stride(0), pred.data_ptr<int64_t>(), stream()),
               op);
  }
  const at::Tensor tokens = tokens_in.contiguous(), parents = parents_in.contiguous();
  at::Tensor path = at::empty({T}, tokens.options()), out = at::empty({2}, tokens.options());
  at::Tensor meta = at::zeros({4}, parents.options());
  check_cuda(cuda::verify_greedy(tokens.data_ptr<int64_t>(), parents.data_ptr<int32_t>(),
                                 pred.data_ptr<int64_t>(), static_cast<int32_t>(T),
                                 path.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                 meta.data_ptr<int32_t>(), stream()),
             op);
  raise_if_bad_parent(read_meta(meta)[0], parents, op);
  const int64_t len = out[0].item<int64_t>();
  return {path.narrow(0, 0, len), out.select(0, 1)};
}

std::tuple<at::Tensor, at::Tensor> verify_sample_cuda(const at::Tensor& tokens_in,
                                                      const at::Tensor& parents_in,
                                                      const at::Tensor& probs_in,
                                                      const at::Tensor& uniforms_in) {
  const char* op = "verify_sample";
  check_sample_args(tokens_in, parents_in, probs_in, uniforms_in);
  const int64_t T = tokens_in.numel();
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), parents = parents_in.contiguous();
  const at::Tensor probs = probs_in.stride(1) == 1 ? probs_in : probs_in.contiguous();
  const at::Tensor uniforms = uniforms_in.contiguous();
  {  // contents: one host sync before the kernel (the op syncs on its result anyway). Stricter than the
     // CPU kernel, which checks only the rows its walk reads: here every row is checked, in one reduction.
    const at::Tensor bad_u = ~((uniforms >= 0.0) & (uniforms < 1.0));
    const at::Tensor bad_rows = (~at::isfinite(probs) | (probs < 0)).any(1) | (probs.sum(1, false, at::kDouble) <= 0);
    const at::Tensor flags = at::stack({bad_u.any(), bad_rows.any()}).cpu();
    if (flags[0].item<bool>()) {
      const int64_t i = bad_u.to(at::kInt).argmax().item<int64_t>();
      fail_bad_uniform(op, i, uniforms[i].item<double>());
    }
    if (flags[1].item<bool>()) fail_bad_probs_row(op, bad_rows.to(at::kInt).argmax().item<int64_t>());
  }
  at::Tensor path = at::empty({T}, tokens.options()), out = at::empty({2}, tokens.options());
  at::Tensor rejected = at::empty({T}, tokens.options()), meta = at::zeros({4}, parents.options());
  check_cuda(cuda::verify_sample(tokens.data_ptr<int64_t>(), parents.data_ptr<int32_t>(),
                                 probs.data_ptr(), dtype_code(probs.scalar_type(), op),
                                 static_cast<int32_t>(T), probs.size(1), probs.stride(0),
                                 uniforms.data_ptr<double>(), path.data_ptr<int64_t>(),
                                 out.data_ptr<int64_t>(), rejected.data_ptr<int64_t>(),
                                 meta.data_ptr<int32_t>(), stream()),
             op);
  const std::vector<int32_t> m = read_meta(meta);
  raise_if_bad_parent(m[0], parents, op);
  TORCH_CHECK_VALUE(m[1] == kNoBadNode, op, ": tokens[", m[1], "] = ",
                    m[1] == kNoBadNode ? 0 : tokens[m[1]].item<int64_t>(),
                    " is outside the vocabulary of size ", probs.size(1));
  const int64_t len = out[0].item<int64_t>();
  return {path.narrow(0, 0, len), out.select(0, 1)};
}

void compact_kv_cuda(at::TensorList caches, int64_t prefix_len, const at::Tensor& accepted) {
  const char* op = "compact_kv";
  TORCH_CHECK_VALUE(accepted.scalar_type() == at::kLong, op, ": accepted must be int64, got ",
                    accepted.scalar_type());
  // Validation needs the indices on the host; the path is a handful of entries.
  const at::Tensor acc_host = accepted.contiguous().cpu();
  check_compact_args(caches, prefix_len, accepted, acc_host.data_ptr<int64_t>());
  const c10::cuda::CUDAGuard guard(caches[0].device());
  const int64_t n = accepted.numel();
  const at::Tensor acc = accepted.contiguous();
  std::vector<void*> ptrs;
  std::vector<int64_t> sb, sh, ss;
  for (const at::Tensor& c : caches) {
    ptrs.push_back(c.data_ptr());
    sb.push_back(c.stride(0));
    sh.push_back(c.stride(1));
    ss.push_back(c.stride(2));
  }
  const at::Tensor& c0 = caches[0];
  check_cuda(cuda::compact_kv(ptrs.data(), sb.data(), sh.data(), ss.data(),
                              static_cast<int32_t>(caches.size()), c0.size(0), c0.size(1), c0.size(3),
                              static_cast<int32_t>(c0.element_size()), prefix_len,
                              acc.data_ptr<int64_t>(), n, stream()),
             op);
}

}  // namespace
}  // namespace c2t_fast

TORCH_LIBRARY_IMPL(c2t_fast, CUDA, m) {
  m.impl("build_tree", &c2t_fast::build_tree_cuda);
  m.impl("prune_tree", &c2t_fast::prune_tree_cuda);
  m.impl("rerank_tree", &c2t_fast::rerank_tree_cuda);
  m.impl("verify_greedy", &c2t_fast::verify_greedy_cuda);
  m.impl("verify_sample", &c2t_fast::verify_sample_cuda);
  m.impl("compact_kv", &c2t_fast::compact_kv_cuda);
}
