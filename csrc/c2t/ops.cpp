// Operator schemas of c2t_fast and their CPU kernels. The CUDA kernels register in
// tree_ops_cuda.cpp (built only with a CUDA toolchain); fake kernels live in c2t_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "tree_ops.h"

extern "C" {
// Importing c2t_fast._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(c2t_fast, m) {
  m.def("build_tree(Tensor parents, int prefix_len) -> "
        "(Tensor depth, Tensor ancestor_bits, Tensor position_ids, Tensor retrieve_indices, "
        "Tensor leaves)");
  m.def("prune_tree(Tensor tree_tokens, Tensor tree_parents, Tensor tree_logp, "
        "Tensor cand_parent, Tensor cand_token, Tensor cand_logp, Tensor cand_conf, "
        "Tensor cand_keep, int max_keep) -> "
        "(Tensor tokens, Tensor parents, Tensor logp, Tensor frontier, Tensor selected)");
  m.def("rerank_tree(Tensor tokens, Tensor parents, Tensor logp, int total_tokens) -> "
        "(Tensor tokens, Tensor parents, Tensor logp, Tensor selected)");
  m.def("verify_greedy(Tensor tokens, Tensor parents, Tensor target) -> "
        "(Tensor path, Tensor bonus)");
  m.def("verify_sample(Tensor tokens, Tensor parents, Tensor probs, Tensor uniforms) -> "
        "(Tensor path, Tensor bonus)");
  m.def("compact_kv(Tensor(a!)[] caches, int prefix_len, Tensor accepted) -> ()");
}

TORCH_LIBRARY_IMPL(c2t_fast, CPU, m) {
  m.impl("build_tree", &c2t_fast::build_tree_cpu);
  m.impl("prune_tree", &c2t_fast::prune_tree_cpu);
  m.impl("rerank_tree", &c2t_fast::rerank_tree_cpu);
  m.impl("verify_greedy", &c2t_fast::verify_greedy_cpu);
  m.impl("verify_sample", &c2t_fast::verify_sample_cpu);
  m.impl("compact_kv", &c2t_fast::compact_kv_cpu);
}
