// Every operator schema of c2t_fast, in one place, and the tree ops' CPU kernels. The other C++ kernels
// register beside their code (score_tail_cpu.cpp, skinny_linear_cpu.cpp, decode_attention_cpu.cpp,
// datastore_cpu.cpp), the tree ops' CUDA kernels in tree_ops_cuda.cpp (built only with a CUDA toolchain); the Python kernels
// (Triton launchers, CPU composites, CUDA fallbacks) and every fake kernel in c2t_fast/kernels/<family>.py.
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
  // kernels/tree_attention.py: a CPU composite and the Triton kernel, both in Python
  m.def("tree_attention(Tensor q, Tensor k, Tensor v, Tensor ancestor_bits, int prefix_len, float scale) -> Tensor");
  // kernels/score_children.py: Triton on CUDA; on the CPU log_softmax then the fused per-row tail below
  m.def("score_children(Tensor logits, Tensor top_values, Tensor top_indices, Tensor parent_logp, int depth, "
        "int k, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float beta, bool log_p) -> (Tensor confidence, "
        "Tensor keep, Tensor tokens, Tensor child_logp, Tensor entropy)");
  m.def("_score_tail(Tensor top_values, Tensor top_indices, Tensor lse, Tensor parent_logp, float depth, int k, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2, float beta, bool log_p) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor");
  // datastore_cpu.cpp: the longest-suffix lookup of decoding.drafts.datastore (CPU only: the corpus stays there)
  m.def("datastore_lookup(Tensor tokens, Tensor order, int[] context, int key_len, int depth, int max_nodes, "
        "int min_match, int max_occurrences) -> Tensor");
}

TORCH_LIBRARY_IMPL(c2t_fast, CPU, m) {
  m.impl("build_tree", &c2t_fast::build_tree_cpu);
  m.impl("prune_tree", &c2t_fast::prune_tree_cpu);
  m.impl("rerank_tree", &c2t_fast::rerank_tree_cpu);
  m.impl("verify_greedy", &c2t_fast::verify_greedy_cpu);
  m.impl("verify_sample", &c2t_fast::verify_sample_cpu);
  m.impl("compact_kv", &c2t_fast::compact_kv_cpu);
}
