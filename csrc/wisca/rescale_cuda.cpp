// Torch-facing side of the CUDA WISCA rescale: checks (shared with the CPU kernel), pointer tables,
// the one host read of the non-finite flag before anything is written, then the scaling launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "rescale.h"
#include "rescale_kernels.h"

namespace wisca_fast {
namespace {

void ok(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "rescale_attention_: CUDA error: ", cudaGetErrorString(err)); }

cuda::DType code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kF32;
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    case at::kDouble: return cuda::kF64;
    default: TORCH_CHECK_VALUE(false, "rescale_attention_: unsupported dtype ", t);
  }
}

at::Tensor to_device_bytes(const void* data, size_t bytes, const at::Device& dev) {
  at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, at::kByte);
  std::memcpy(host.data_ptr(), data, bytes);
  return host.to(dev);
}

at::Tensor rescale_attention_cuda(at::TensorList weights, at::TensorList biases, at::TensorList exp_avg,
                                  at::TensorList exp_avg_sq, at::TensorList shadows, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim, c10::string_view granularity,
                                  c10::string_view norm, bool rope_interleaved, bool qk, bool vo, double clamp_lo,
                                  double clamp_hi, bool pow2, double eps) {
  const RescaleArgs a = check_rescale_args(weights, biases, exp_avg, exp_avg_sq, shadows, num_heads, num_kv_heads,
                                           head_dim, std::string(granularity), std::string(norm), rope_interleaved,
                                           qk, vo, clamp_lo, clamp_hi, pow2, eps);
  const at::Device dev = weights[0].device();
  TORCH_CHECK_VALUE(dev.is_cuda(), "rescale_attention_: expected CUDA tensors, got ", dev);
  for (const at::Tensor& w : weights)
    TORCH_CHECK_VALUE(w.scalar_type() == weights[0].scalar_type(), "rescale_attention_: the CUDA kernel needs one "
                      "dtype for all weights, got ", w.scalar_type(), " and ", weights[0].scalar_type());
  const c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t L = a.L, QR = a.Hq * a.D, KR = a.Hkv * a.D, stride = 2 * QR + 2 * KR;

  std::vector<int64_t> table(layout::kWeights * L);
  for (int64_t i = 0; i < layout::kWeights; ++i)
    for (int64_t l = 0; l < L; ++l)
      table[i * L + l] = reinterpret_cast<int64_t>(weights[layout::weight(l, i)].data_ptr());
  at::Tensor table_d = to_device_bytes(table.data(), table.size() * sizeof(int64_t), dev);
  auto ptrs = reinterpret_cast<const void* const*>(table_d.data_ptr());
  cuda::ReduceArgs ra{ptrs, ptrs + L, ptrs + 2 * L, ptrs + 3 * L, code(weights[0].scalar_type()), L, QR, KR,
                      weights[0].size(1), a.fro};
  auto f64 = at::TensorOptions().device(dev).dtype(at::kDouble);
  at::Tensor sums = at::empty({L * stride}, f64), mults = at::empty({L * stride}, f64);
  at::Tensor factors = a.channel ? at::empty({L, 2, a.Hkv, a.D}, f64.dtype(at::kFloat))
                                 : at::empty({L, 2}, f64.dtype(at::kFloat));
  at::Tensor bad = at::empty({1}, f64.dtype(at::kInt));
  ok(cuda::reduce(ra, sums.data_ptr<double>(), stream));
  cuda::FactorArgs fa{L, a.Hq, a.Hkv, a.D, a.channel, a.fro, a.interleaved, a.qk, a.vo, a.pow2,
                      a.clamp_lo, a.clamp_hi, a.eps};
  bad.fill_(0x7fffffff);
  ok(cuda::factors(fa, sums.data_ptr<double>(), mults.data_ptr<double>(), factors.data_ptr<float>(),
                   bad.data_ptr<int32_t>(), stream));
  const int32_t first_bad = bad.item<int32_t>();  // the one sync: nothing is written before it
  TORCH_CHECK_VALUE(first_bad == 0x7fffffff, "rescale_attention_: non-finite values in layer ", first_bad - 1,
                    "; nothing was rescaled");

  std::vector<cuda::Segment> scale_segs, shadow_segs;
  int64_t max_elems = 0;
  auto add = [&](std::vector<cuda::Segment>& segs, const at::Tensor& t, const at::Tensor* src, const double* mult,
                 bool by_row, int power) {
    if (t.numel() == 0) return;
    const int64_t rows = t.size(0), cols = t.dim() == 2 ? t.size(1) : 1;
    segs.push_back({t.data_ptr(), src ? src->data_ptr() : nullptr, mult, rows, cols, code(t.scalar_type()),
                    src ? code(src->scalar_type()) : 0, power, by_row ? 1 : 0});
    max_elems = std::max(max_elems, t.numel());
  };
  const double* m = mults.data_ptr<double>();
  for (int64_t l = 0; l < L; ++l)
    for (int64_t i = 0; i < 4; ++i) {
      const double* mult = m + l * stride + (i == 0 ? 0 : i == 1 ? QR : i == 2 ? QR + KR : QR + 2 * KR);
      const bool by_row = i != 3;
      add(scale_segs, weights[layout::weight(l, i)], nullptr, mult, by_row, 1);
      if (a.has_state) {
        add(scale_segs, exp_avg[layout::moment(l, i)], nullptr, mult, by_row, -1);
        add(scale_segs, exp_avg_sq[layout::moment(l, i)], nullptr, mult, by_row, -2);
      }
      if (a.has_shadow)
        add(shadow_segs, shadows[layout::shadow(l, i)], &weights[layout::weight(l, i)], nullptr, true, 1);
      if (i < 3 && a.has_bias) {
        add(scale_segs, biases[layout::bias(l, i)], nullptr, mult, true, 1);
        if (a.has_state) {
          add(scale_segs, exp_avg[layout::bias_moment(l, i)], nullptr, mult, true, -1);
          add(scale_segs, exp_avg_sq[layout::bias_moment(l, i)], nullptr, mult, true, -2);
        }
      }
    }
  // Shadows are rewritten from the scaled masters, so they go in a second launch.
  for (auto* segs : {&scale_segs, &shadow_segs}) {
    if (segs->empty()) continue;
    at::Tensor d = to_device_bytes(segs->data(), segs->size() * sizeof(cuda::Segment), dev);
    ok(cuda::apply(reinterpret_cast<const cuda::Segment*>(d.data_ptr()), static_cast<int32_t>(segs->size()),
                   max_elems, stream));
  }
  return factors;
}

}  // namespace
}  // namespace wisca_fast

TORCH_LIBRARY_IMPL(wisca_fast, CUDA, m) {
  m.impl("rescale_attention_", &wisca_fast::rescale_attention_cuda);
}
