"""c2t_fast: lossless speculative decoding with classifier-pruned token trees (C2T, arXiv:2502.13652).

Layout (each folder imports only the ones listed before it; docs/DESIGN.md):
``kernels`` (the compiled/Triton ops door and their references) -> ``hf`` (everything transformers:
the attention patch, the target adapter, model loading) -> ``decoding`` (tree, strategies, drafts,
classifier, engine) -> ``training`` (draft head, classifier, their data) -> ``bench`` -> ``cli``.
"""

import sys as _sys

from .decoding.classifier import C2TClassifier, ClassifierConfig
from .decoding.drafts import DraftLM, DraftProtocol, EagleDraftHead
from .decoding.engine import Generation, SpeculativeGenerator
from .decoding.front_door import generate
from .decoding.classifier import load_classifier
from .decoding.drafts.loading import load_draft
from .decoding.metrics import Metrics
from .decoding.strategies import C2T, Chain, ChainC2T, Eagle2, Static, Strategy, strategy_from_name
from .hf.adapter import logits_processors
from .hf.attention import compact_dynamic_cache, patch, unpatch
from .hf.loading import load_target
from .kernels import ops, reference
from .kernels.ops import (Tree, TreeBuffers, Verdict, build_tree, compact_kv, prune_tree, rerank_tree, tree_attention,
                          verify_greedy, verify_sample)

# The ops door keeps its 0.1 import paths: `import c2t_fast.ops` / `from c2t_fast.reference import ...`.
_sys.modules[__name__ + ".ops"] = ops
_sys.modules[__name__ + ".reference"] = reference

__version__ = "0.1.0"

__all__ = [
    "C2T", "C2TClassifier", "Chain", "ChainC2T", "ClassifierConfig", "DraftLM", "DraftProtocol", "Eagle2",
    "EagleDraftHead", "Generation", "generate", "Metrics", "SpeculativeGenerator", "Static", "Strategy", "Tree", "TreeBuffers",
    "Verdict", "build_tree", "compact_dynamic_cache", "compact_kv", "load_classifier", "load_draft", "load_target", "logits_processors",
    "ops", "patch", "prune_tree", "reference", "rerank_tree", "strategy_from_name", "tree_attention", "unpatch",
    "verify_greedy", "verify_sample",
]
