"""The one door into c2t_fast's compiled and Triton code.

Importing it registers every ``torch.ops.c2t_fast.*`` operator (C++ CPU kernels, CUDA kernels when they
were compiled, the Triton launchers), their fake kernels for ``torch.compile``, and an explicit fallback
for CUDA tensors when a CUDA kernel was not built (the pure-torch reference on the device, a warning
once per op). One module per op family, each a thin checked call with its fake beside it:

- ``tree_ops``: build_tree, prune_tree, rerank_tree, verify_greedy, verify_sample, compact_kv;
- ``tree_attention``: tree-masked attention over a cache that ends with the tree;
- ``score_children``: the C2T classifier's scoring of one expansion layer;
- ``skinny_linear``: a few-row CPU GEMM (and the routing of a model's linear layers through it);
- ``decode_attention``: batched one-token attention over a static cache;
- ``datastore_lookup``: the datastore drafter's longest-suffix lookup (CPU).

Schemas live in ``csrc/c2t/ops.cpp``; references in ``kernels/reference.py``. The raw operators are
``torch.ops.c2t_fast.<name>``.
"""

from __future__ import annotations

from .datastore_lookup import datastore_lookup, prepared_lookup
from .decode_attention import decode_attention
from .library import cuda_kernels_compiled, has_cuda_kernel
from .score_children import MAX_CLASSIFIER_HIDDEN, LayerScores, score_children
from .skinny_linear import SKINNY_MAX_ROWS, skinny_linear
from .tree_attention import CPU_SINGLE_PASS_MAX_PREFIX, MAX_TREE_NODES, tree_attention
from .tree_ops import (Tree, TreeBuffers, Verdict, build_tree, compact_kv, prune_tree, rerank_tree, verify_greedy,
                       verify_sample)

__all__ = [
    "CPU_SINGLE_PASS_MAX_PREFIX", "LayerScores", "MAX_CLASSIFIER_HIDDEN", "MAX_TREE_NODES", "SKINNY_MAX_ROWS", "Tree",
    "TreeBuffers", "Verdict", "build_tree", "compact_kv", "cuda_kernels_compiled", "datastore_lookup", "prepared_lookup",
    "decode_attention",
    "has_cuda_kernel", "prune_tree", "rerank_tree", "score_children", "skinny_linear", "tree_attention",
    "verify_greedy", "verify_sample",
]
