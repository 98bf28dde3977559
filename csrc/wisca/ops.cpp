// Operator schema of wisca_fast and its CPU kernel. The CUDA kernel registers in rescale_cuda.cpp
// (built only with a CUDA toolchain); the fake kernel lives in wisca_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

namespace wisca_fast {
at::Tensor rescale_attention_cpu(at::TensorList weights, at::TensorList biases, at::TensorList exp_avg,
                                 at::TensorList exp_avg_sq, at::TensorList shadows, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, c10::string_view granularity,
                                 c10::string_view norm, bool rope_interleaved, bool qk, bool vo, double clamp_lo,
                                 double clamp_hi, bool pow2, double eps);
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(wisca_fast, m) {
  m.def("rescale_attention_(Tensor(a!)[] weights, Tensor(b!)[] biases, Tensor(c!)[] exp_avg, "
        "Tensor(d!)[] exp_avg_sq, Tensor(e!)[] shadows, int num_heads, int num_kv_heads, int head_dim, "
        "str granularity='tensor', str norm='l1', bool rope_interleaved=False, bool qk=True, bool vo=True, "
        "float clamp_lo=0., float clamp_hi=0., bool pow2=False, float eps=1e-12) -> Tensor");
}

TORCH_LIBRARY_IMPL(wisca_fast, CPU, m) {
  m.impl("rescale_attention_", &wisca_fast::rescale_attention_cpu);
}
