// CPU tail of c2t_fast::score_children: everything after the row's log-sum-exp, fused per row (top-M
// entropy, the top-K children's joint log-probs, features, the 3 -> h -> 1 MLP, sigmoid, keep flag).
// On the CPU this replaces ~15 small torch ops whose dispatch cost dominated for one frontier row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace c2t_fast {
namespace {

template <typename scalar_t>
void tail_rows(const scalar_t* tv, const int64_t* ti, const float* lse, const float* parent, int64_t n, int64_t M,
               int64_t K, double depth, const float* w1, const float* b1, const float* w2, float b2, int64_t H,
               double beta, bool log_p, float* conf, bool* keep, int64_t* tok, float* clp, float* ent) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* v = tv + r * M;
      double h = 0.0;  // -sum p log p over the top-M, p = 0 contributes 0
      for (int64_t j = 0; j < M; ++j) {
        const double lp = static_cast<double>(v[j]) - lse[r];
        const double p = std::exp(lp);
        if (p > 0) h -= p * lp;
      }
      ent[r] = static_cast<float>(h);
      for (int64_t c = 0; c < K; ++c) {
        const float lpc = parent[r] + (static_cast<float>(v[c]) - lse[r]);
        const float f0 = log_p ? lpc : std::exp(lpc);
        float z = b2;
        for (int64_t u = 0; u < H; ++u) {
          const float a = f0 * w1[3 * u] + static_cast<float>(h) * w1[3 * u + 1] +
                          static_cast<float>(depth) * w1[3 * u + 2] + b1[u];
          if (!(a <= 0)) z += a * w2[u];  // relu that keeps NaN (as torch.relu): NaN in, NaN confidence out
        }
        const float cf = 1.0f / (1.0f + std::exp(-z));
        conf[r * K + c] = cf;
        keep[r * K + c] = cf >= beta;
        tok[r * K + c] = ti[r * M + c];
        clp[r * K + c] = lpc;
      }
    }
  });
}

// score_children (c2t_fast/kernels/score_children.py) validates its own arguments before calling this, but the op is
// registered and so callable by anyone: it checks everything it reads, in the same terms.
void check_score_tail_args(const at::Tensor& top_values, const at::Tensor& top_indices, const at::Tensor& lse,
                           const at::Tensor& parent_logp, int64_t k, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2) {
  const char* op = "_score_tail";
  TORCH_CHECK_VALUE(top_values.dim() == 2 && at::isFloatingType(top_values.scalar_type()), op,
                    ": top_values must be floating [n, M], got ", top_values.scalar_type(), " ", top_values.sizes());
  const int64_t n = top_values.size(0), M = top_values.size(1);
  TORCH_CHECK_VALUE(top_indices.scalar_type() == at::kLong && top_indices.sizes() == top_values.sizes(), op,
                    ": top_indices must be int64 of top_values' shape ", top_values.sizes(), ", got ",
                    top_indices.scalar_type(), " ", top_indices.sizes());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == n, op,
                    ": lse must be float32 [n] = [", n, "], got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(parent_logp.scalar_type()) && parent_logp.dim() == 1 &&
                        parent_logp.size(0) == n,
                    op, ": parent_logp must be floating [n] = [", n, "], got ", parent_logp.scalar_type(), " ",
                    parent_logp.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= M, op, ": k = ", k, " must be in 1..M = ", M);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == 3 && w1.size(0) >= 1, op, ": w1 must be [h, 3], got ", w1.sizes());
  const int64_t h = w1.size(0);
  TORCH_CHECK_VALUE(b1.dim() == 1 && b1.size(0) == h, op, ": b1 must be [h] = [", h, "], got ", b1.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == 1 && w2.size(1) == h, op, ": w2 must be [1, h] = [1, ", h,
                    "], got ", w2.sizes());
  TORCH_CHECK_VALUE(b2.dim() == 1 && b2.size(0) == 1, op, ": b2 must be [1], got ", b2.sizes());
  for (const at::Tensor* w : {&w1, &b1, &w2, &b2}) {
    TORCH_CHECK_VALUE(w->scalar_type() == at::kFloat, op, ": the classifier weights must be float32, got ",
                      w->scalar_type());
  }
  for (const at::Tensor* t : {&top_indices, &lse, &parent_logp, &w1, &b1, &w2, &b2}) {
    TORCH_CHECK_VALUE(t->device() == top_values.device(), op, ": all inputs must be on ", top_values.device(),
                      ", got one on ", t->device());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_tail_cpu(
    const at::Tensor& top_values, const at::Tensor& top_indices, const at::Tensor& lse,
    const at::Tensor& parent_logp, double depth, int64_t k, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, double beta, bool log_p) {
  check_score_tail_args(top_values, top_indices, lse, parent_logp, k, w1, b1, w2, b2);
  const at::Tensor tv = top_values.contiguous(), ti = top_indices.contiguous(), l = lse.contiguous();
  const at::Tensor pl = parent_logp.contiguous().to(at::kFloat);
  const at::Tensor W1 = w1.contiguous(), B1 = b1.contiguous(), W2 = w2.contiguous();
  const int64_t n = tv.size(0), M = tv.size(1), H = W1.size(0);
  auto f32 = tv.options().dtype(at::kFloat);
  at::Tensor conf = at::empty({n, k}, f32), clp = at::empty({n, k}, f32), ent = at::empty({n}, f32);
  at::Tensor keep = at::empty({n, k}, f32.dtype(at::kBool)), tok = at::empty({n, k}, f32.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tv.scalar_type(), "score_tail", [&] {
    tail_rows<scalar_t>(tv.data_ptr<scalar_t>(), ti.data_ptr<int64_t>(), l.data_ptr<float>(), pl.data_ptr<float>(),
                        n, M, k, depth, W1.data_ptr<float>(), B1.data_ptr<float>(), W2.data_ptr<float>(),
                        b2.item<float>(), H, beta, log_p, conf.data_ptr<float>(), keep.data_ptr<bool>(),
                        tok.data_ptr<int64_t>(), clp.data_ptr<float>(), ent.data_ptr<float>());
  });
  return {conf, keep, tok, clp, ent};
}

}  // namespace
}  // namespace c2t_fast

// Schema in ops.cpp.
TORCH_LIBRARY_IMPL(c2t_fast, CPU, m) {
  m.impl("_score_tail", &c2t_fast::score_tail_cpu);
}
