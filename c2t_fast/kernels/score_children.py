"""score_children: batched C2T classifier scoring of one expansion layer (the children's joint
log-probabilities, the row entropies, the 3 -> h -> 1 classifier's confidence and the keep flag).

CUDA: the Triton kernel of ``kernels/triton/score_children.py``, one launch per layer. CPU: torch's fused
log_softmax for the one pass over V, the rest fused per row in C++ (``c2t_fast::_score_tail``,
``csrc/c2t/score_tail_cpu.cpp``). Schemas in ``csrc/c2t/ops.cpp``; checks, kernels, fake and wrapper here."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .library import IMPL

MAX_CLASSIFIER_HIDDEN = 64


def _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2) -> None:
    op = "score_children"
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be floating [n, V], got {logits.dtype} {tuple(logits.shape)}")
    n, V = logits.shape
    if top_values.dim() != 2 or top_values.shape[0] != n or top_indices.shape != top_values.shape:
        raise ValueError(f"{op}: top_values/top_indices must both be [n, M] with n = {n}, got "
                         f"{tuple(top_values.shape)} and {tuple(top_indices.shape)}")
    M = top_values.shape[1]
    if top_indices.dtype != torch.int64:
        raise ValueError(f"{op}: top_indices must be int64 (from torch.topk), got {top_indices.dtype}")
    if not 1 <= k <= min(M, V):
        raise ValueError(f"{op}: k = {k} must be in 1..min(M, V) = {min(M, V)}")
    if M > V:
        raise ValueError(f"{op}: top-M = {M} exceeds the vocabulary {V}")
    if parent_logp.shape != (n,):
        raise ValueError(f"{op}: parent_logp must be [n] = [{n}], got {tuple(parent_logp.shape)}")
    h = w1.shape[0] if w1.dim() == 2 else -1
    if w1.dim() != 2 or w1.shape[1] != 3 or b1.shape != (h,) or w2.shape != (1, h) or b2.shape != (1,):
        raise ValueError(f"{op}: classifier weights must be W1 [h, 3], b1 [h], W2 [1, h], b2 [1]; got "
                         f"{tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}")
    if not 1 <= h <= MAX_CLASSIFIER_HIDDEN:
        raise ValueError(f"{op}: hidden size {h} outside 1..{MAX_CLASSIFIER_HIDDEN}")
    if any(t.dtype != torch.float32 for t in (w1, b1, w2, b2)):
        raise ValueError(f"{op}: classifier weights must be float32")
    tensors = (logits, top_values, top_indices, parent_logp, w1, b1, w2, b2)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")


def _score_children_cpu(logits, top_values, top_indices, parent_logp, depth, k, w1, b1, w2, b2, beta, log_p):
    """The one pass over V is the log-sum-exp, read off torch's fused log_softmax at each row's maximum
    (lse = max - log_softmax[argmax]; on the CPU that single vectorised kernel beats torch.logsumexp 2x
    and a scalar loop 5x); the rest runs fused per row in C++ (``c2t_fast::_score_tail``)."""
    _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2)
    row_max = top_values[:, :1].float()
    lse = row_max - torch.log_softmax(logits.float(), -1).gather(-1, top_indices[:, :1])
    lse = torch.where(torch.isneginf(row_max), row_max, lse)  # an all -inf row: p = 0 everywhere
    return torch.ops.c2t_fast._score_tail(top_values, top_indices, lse.view(-1), parent_logp, float(depth), k,
                                          w1, b1, w2, b2, beta, log_p)


def _score_children_cuda(logits, top_values, top_indices, parent_logp, depth, k, w1, b1, w2, b2, beta, log_p):
    _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2)
    from .triton.score_children import score_children as triton_score_children

    return triton_score_children(logits if logits.stride(1) == 1 else logits.contiguous(),
                                 top_values if top_values.stride(1) == 1 else top_values.contiguous(),
                                 top_indices if top_indices.stride(1) == 1 else top_indices.contiguous(),
                                 parent_logp.contiguous(), depth, k, w1.contiguous(), b1.contiguous(),
                                 w2.contiguous(), b2.contiguous(), beta, log_p)


IMPL.impl("score_children", _score_children_cpu, "CPU")
IMPL.impl("score_children", _score_children_cuda, "CUDA")


@torch.library.register_fake("c2t_fast::score_children")
def _score_children_fake(logits, top_values, top_indices, parent_logp, depth, k, w1, b1, w2, b2, beta, log_p):
    _check_score_children(logits, top_values, top_indices, parent_logp, k, w1, b1, w2, b2)
    n = logits.shape[0]
    f = logits.new_empty((n, k), dtype=torch.float32)
    return (f, logits.new_empty((n, k), dtype=torch.bool), logits.new_empty((n, k), dtype=torch.int64),
            f.new_empty((n, k)), f.new_empty((n,)))


class LayerScores(NamedTuple):
    confidence: torch.Tensor  # float32 [n, K], sigmoid output C
    keep: torch.Tensor  # bool [n, K], C >= beta (first pruning)
    tokens: torch.Tensor  # int64 [n, K], child tokens (top-K of each row)
    child_logp: torch.Tensor  # float32 [n, K], joint log-prob of each child
    entropy: torch.Tensor  # float32 [n], top-M entropy of each row (shared by its children)


def score_children(logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                   parent_logp: torch.Tensor, depth: int, k: int, weights, beta: float,
                   log_p: bool = False) -> LayerScores:
    """Score the top-``k`` children of every frontier row in one launch.

    logits ``[n, V]`` (fp32/fp16/bf16) are the draft's next-token logits of the n frontier nodes;
    ``top_values, top_indices = torch.topk(logits, M)`` (sorted); ``parent_logp [n]`` the frontier's
    joint log-probs; ``depth`` the children's depth (root's children: 0); ``weights`` the classifier's
    ``(W1 [h, 3], b1 [h], W2 [1, h], b2 [1])`` in fp32 (unused features have zero columns).
    """
    w1, b1, w2, b2 = weights
    return LayerScores(*torch.ops.c2t_fast.score_children(
        logits, top_values, top_indices, parent_logp, int(depth), int(k), w1, b1, w2, b2, float(beta), bool(log_p)))
