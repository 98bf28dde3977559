"""Tree ops: building a tree's verification buffers, C2T pruning, EAGLE-2 reranking, greedy and lossless
sampling acceptance, and compacting the accepted slots of a KV cache.

C++ kernels in ``csrc/c2t/tree_ops_cpu.cpp`` and CUDA ones in ``tree_ops_cuda.cpp``/``tree_kernels.cu``
(schemas in ``csrc/c2t/ops.cpp``). This module holds their fake kernels, the explicit fallback for CUDA
tensors when the CUDA kernels were not built (the reference on the device, logged once per op), and the
Python-facing wrappers, which take Python-friendly inputs and return named tuples."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from . import reference
from .library import IMPL, TREE_OPS, dynamic_size, has_cuda_kernel, warn_fallback


@torch.library.register_fake("c2t_fast::build_tree")
def _build_tree_fake(parents, prefix_len):
    T = parents.shape[0]
    W = (T + 63) // 64
    L, depth1 = dynamic_size(), dynamic_size()
    return (parents.new_empty(T), parents.new_empty((T, W), dtype=torch.int64),
            parents.new_empty(T, dtype=torch.int64), parents.new_empty((L, depth1), dtype=torch.int64),
            parents.new_empty(L, dtype=torch.int64))


@torch.library.register_fake("c2t_fast::prune_tree")
def _prune_tree_fake(tree_tokens, tree_parents, tree_logp, cand_parent, cand_token, cand_logp,
                     cand_conf, cand_keep, max_keep):
    n = dynamic_size()
    T = tree_tokens.shape[0]
    return (tree_tokens.new_empty(T + n), tree_parents.new_empty(T + n), tree_logp.new_empty(T + n),
            cand_parent.new_empty(n), cand_parent.new_empty(n))


@torch.library.register_fake("c2t_fast::rerank_tree")
def _rerank_tree_fake(tokens, parents, logp, total_tokens):
    n = dynamic_size()
    return tokens.new_empty(n), parents.new_empty(n), logp.new_empty(n), tokens.new_empty(n)


@torch.library.register_fake("c2t_fast::verify_greedy")
def _verify_greedy_fake(tokens, parents, target):
    return tokens.new_empty(dynamic_size()), tokens.new_empty(())


@torch.library.register_fake("c2t_fast::verify_sample")
def _verify_sample_fake(tokens, parents, probs, uniforms):
    return tokens.new_empty(dynamic_size()), tokens.new_empty(())


@torch.library.register_fake("c2t_fast::compact_kv")
def _compact_kv_fake(caches, prefix_len, accepted):
    return None


def _fallback(name: str):
    """The reference of ``name`` as a CUDA kernel: a CPU-only build still runs on the GPU, and says so."""
    ref = getattr(reference, name)

    def run(*args):
        warn_fallback(name, "rebuild with C2T_FAST_CUDA=1 for the fused kernel")
        return ref(*args)

    return run


for _name in TREE_OPS:
    if not has_cuda_kernel(_name):
        IMPL.impl(_name, _fallback(_name), "CUDA")


class TreeBuffers(NamedTuple):
    """What verification needs for one tree of T nodes."""

    depth: torch.Tensor  # int32[T], root 0
    ancestor_bits: torch.Tensor  # int64[T, ceil(T/64)], bit j of row i: j is i or an ancestor of i
    position_ids: torch.Tensor  # int64[T] = prefix_len + depth
    retrieve_indices: torch.Tensor  # int64[L, max_depth + 1], root->leaf paths padded with -1
    leaves: torch.Tensor  # int64[L], ascending


class Tree(NamedTuple):
    """A token tree in topological order (node 0 is the root)."""

    tokens: torch.Tensor  # int64[T]
    parents: torch.Tensor  # int32[T], parents[0] == -1
    logp: torch.Tensor  # float32[T], joint log-probability of the root->node path (root 0)


class Verdict(NamedTuple):
    path: torch.Tensor  # int64[tau + 1], accepted node indices root first
    bonus: torch.Tensor  # int64[], the target's own next token after the path

    @property
    def accepted_len(self) -> int:
        """tau: accepted draft tokens, root and bonus excluded."""
        return self.path.numel() - 1


def _as_parents(parents) -> torch.Tensor:
    p = torch.as_tensor(parents)
    if p.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents must be an integer tensor, got {p.dtype}")
    if p.dtype == torch.int64 and p.numel():
        lo, hi = torch.aminmax(p)
        # int32 would wrap such values to small, valid-looking ids
        if int(lo) < -(2 ** 31) or int(hi) >= 2 ** 31:
            raise ValueError(f"parents holds {int(lo) if int(lo) < -(2 ** 31) else int(hi)}, outside int32; a "
                             "parent index must be a node of the tree")
    return p.to(torch.int32)


def build_tree(parents, prefix_len: int = 0) -> TreeBuffers:
    """Derive verification buffers from ``parents`` (int32/int64 [T], topological, root at 0)."""
    return TreeBuffers(*torch.ops.c2t_fast.build_tree(_as_parents(parents), int(prefix_len)))


def prune_tree(tree: Tree, cand_parent, cand_token, cand_logp, cand_conf, cand_keep,
               max_keep: int) -> tuple[Tree, torch.Tensor, torch.Tensor]:
    """C2T second pruning for one layer of scored candidates ``[N]``.

    Keeps at most ``max_keep`` (``< 0``: no cap) of the candidates with ``cand_keep`` by confidence,
    appends them (in candidate order) to ``tree``. Returns ``(new_tree, frontier, selected)`` where
    ``frontier`` are the new nodes' indices in the tree and ``selected`` their candidate indices.
    """
    tokens, parents, logp, frontier, selected = torch.ops.c2t_fast.prune_tree(
        tree.tokens, tree.parents, tree.logp, cand_parent, cand_token, cand_logp, cand_conf,
        cand_keep, int(max_keep))
    return Tree(tokens, parents, logp), frontier, selected


def rerank_tree(tree: Tree, total_tokens: int) -> tuple[Tree, torch.Tensor]:
    """EAGLE-2 rerank: the root and the top ``total_tokens - 1`` nodes by joint log-prob, closed
    under parents and renumbered. Returns ``(new_tree, selected)`` (original node indices)."""
    tokens, parents, logp, selected = torch.ops.c2t_fast.rerank_tree(
        tree.tokens, tree.parents, tree.logp, int(total_tokens))
    return Tree(tokens, parents, logp), selected


def verify_greedy(tokens: torch.Tensor, parents, target: torch.Tensor) -> Verdict:
    """Greedy acceptance. ``target`` is the target's logits over the tree ``[T, V]`` or their
    argmax ``int64[T]``."""
    return Verdict(*torch.ops.c2t_fast.verify_greedy(tokens, _as_parents(parents), target))


def verify_sample(tokens: torch.Tensor, parents, probs: torch.Tensor,
                  uniforms: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Verdict:
    """Lossless sampling acceptance. ``probs [T, V]`` are the target's processed probabilities
    (temperature / top-k / top-p applied); ``uniforms float64[T]`` (slot 0 draws the bonus token)
    are drawn from ``generator`` when not given."""
    if uniforms is None:
        uniforms = torch.rand(tokens.numel(), dtype=torch.float64, generator=generator,
                              device=probs.device if generator is None else generator.device)
        uniforms = uniforms.to(probs.device)
    return Verdict(*torch.ops.c2t_fast.verify_sample(tokens, _as_parents(parents), probs, uniforms))


def compact_kv(caches: Sequence[torch.Tensor], prefix_len: int, accepted: torch.Tensor) -> int:
    """Move the accepted tree slots of every cache ``[B, Hkv, S, D]`` right after the prefix, in
    place, in one call. Returns the new valid length ``prefix_len + len(accepted)``."""
    torch.ops.c2t_fast.compact_kv(list(caches), int(prefix_len), accepted)
    return int(prefix_len) + accepted.numel()
