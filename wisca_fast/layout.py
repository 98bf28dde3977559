"""The per-layer tensors of one WISCA transition and the flat lists the op takes, in one place.

``torch.ops.wisca_fast.rescale_attention_`` takes flat lists (a dispatcher op cannot take objects).
Per layer l: weights (q, k, v, o) at ``4l + i``; biases (q, k, v) at ``3l + i``; Adam moments
``exp_avg`` / ``exp_avg_sq`` (q, k, v, o weights, then q, k, v biases) at ``7l + i``; low-precision
shadows of fp32 masters (q, k, v, o) at ``4l + i``. Empty tensors mark absent entries; an empty list
means none of that kind. The C++ side reads the same table from ``csrc/wisca/rescale.h``
(``namespace layout``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

WEIGHTS = ("q", "k", "v", "o")
BIASES = ("bq", "bk", "bv")  # the o_proj bias is never scaled
MOMENTS = WEIGHTS + BIASES  # the keys of AttentionTensors.exp_avg / exp_avg_sq
SHADOWS = WEIGHTS


@dataclass
class AttentionTensors:
    """One attention layer's tensors for a rescale (nn.Linear layout: W_q ``[Hq*D, C]``, W_k / W_v
    ``[Hkv*D, C]``, W_o ``[C, Hq*D]``). Optional entries may be None / missing."""

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    # Adam moments keyed by MOMENTS ("q", "k", "v", "o", "bq", "bk", "bv")
    exp_avg: dict = field(default_factory=dict)
    exp_avg_sq: dict = field(default_factory=dict)
    # low-precision shadows of fp32 masters keyed by SHADOWS
    shadows: dict = field(default_factory=dict)

    @property
    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.wq, self.wk, self.wv, self.wo

    @property
    def biases(self) -> tuple[torch.Tensor | None, ...]:
        return self.bq, self.bk, self.bv


def _or_none(t: torch.Tensor) -> torch.Tensor | None:
    return t if t.numel() else None


@dataclass
class OpLists:
    """The op's five flat lists (see the module docstring)."""

    weights: list
    biases: list
    exp_avg: list
    exp_avg_sq: list
    shadows: list

    @property
    def num_layers(self) -> int:
        return len(self.weights) // len(WEIGHTS)

    @classmethod
    def pack(cls, layers: list[AttentionTensors]) -> "OpLists":
        """Flatten per-layer tensors; absent entries become empty tensors, absent kinds empty lists."""
        anchor = layers[0].wq

        def filled(t):
            return t if t is not None else anchor.new_empty(0)

        has_bias = any(b is not None for lay in layers for b in lay.biases)
        has_state = any(lay.exp_avg for lay in layers)
        has_shadow = any(lay.shadows for lay in layers)
        return cls(
            weights=[t for lay in layers for t in lay.weights],
            biases=[filled(b) for lay in layers for b in lay.biases] if has_bias else [],
            exp_avg=[filled(lay.exp_avg.get(k)) for lay in layers for k in MOMENTS] if has_state else [],
            exp_avg_sq=[filled(lay.exp_avg_sq.get(k)) for lay in layers for k in MOMENTS] if has_state else [],
            shadows=[filled(lay.shadows.get(k)) for lay in layers for k in SHADOWS] if has_shadow else [])

    def layer(self, l: int) -> AttentionTensors:
        """Layer ``l``'s tensors by name (empty entries as None / missing)."""
        w = self.weights[len(WEIGHTS) * l:len(WEIGHTS) * (l + 1)]
        b = self.biases[len(BIASES) * l:len(BIASES) * (l + 1)] if self.biases else [None] * len(BIASES)
        out = AttentionTensors(*w, *(None if t is None else _or_none(t) for t in b))
        for key, i in zip(MOMENTS, range(len(MOMENTS) * l, len(MOMENTS) * (l + 1))):
            if self.exp_avg and self.exp_avg[i].numel():
                out.exp_avg[key], out.exp_avg_sq[key] = self.exp_avg[i], self.exp_avg_sq[i]
        for key, i in zip(SHADOWS, range(len(SHADOWS) * l, len(SHADOWS) * (l + 1))):
            if self.shadows and self.shadows[i].numel():
                out.shadows[key] = self.shadows[i]
        return out
