"""c2t_fast: lossless speculative decoding with classifier-pruned token trees (C2T, arXiv:2502.13652)."""

from . import ops
from .attention import patch, unpatch
from .engine import Metrics, SpeculativeGenerator
from .ops import (Tree, TreeBuffers, Verdict, build_tree, compact_kv, prune_tree, rerank_tree, tree_attention,
                  verify_greedy, verify_sample)

__version__ = "0.1.0"

__all__ = [
    "Metrics", "SpeculativeGenerator", "Tree", "TreeBuffers", "Verdict", "build_tree", "compact_kv", "ops", "patch", "prune_tree", "rerank_tree",
    "tree_attention", "unpatch", "verify_greedy", "verify_sample",
]
