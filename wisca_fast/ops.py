"""The one door into wisca_fast's compiled code: ``torch.ops.wisca_fast.rescale_attention_`` (C++ CPU
kernel, CUDA kernel when compiled, fake kernel) and a Python-friendly wrapper."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (registers the operator)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError("wisca_fast._C is not built. Install with `pip install --no-build-isolation -e .` after torch "
                      f"(see README.md). Original error: {exc}") from exc

log = logging.getLogger("wisca_fast")
_COMPILED_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("wisca_fast::rescale_attention_", "CUDA")


def cuda_kernels_compiled() -> bool:
    return _COMPILED_CUDA


@torch.library.register_fake("wisca_fast::rescale_attention_")
def _fake(weights, biases, exp_avg, exp_avg_sq, shadows, num_heads, num_kv_heads, head_dim, granularity="tensor",
          norm="l1", rope_interleaved=False, qk=True, vo=True, clamp_lo=0.0, clamp_hi=0.0, pow2=False, eps=1e-12):
    L = len(weights) // 4
    if granularity == "channel":
        return weights[0].new_empty((L, 2, num_kv_heads, head_dim), dtype=torch.float32)
    return weights[0].new_empty((L, 2), dtype=torch.float32)


if not _COMPILED_CUDA:
    _warned = False

    def _cuda_fallback(*args):
        global _warned
        if not _warned:
            _warned = True
            log.warning("wisca_fast::rescale_attention_ has no compiled CUDA kernel in this build; running the "
                        "pure-torch reference on the GPU (rebuild with C2T_FAST_CUDA=1 for the fused kernel)")
        return reference.rescale_attention_(*args)

    _fallback_lib = torch.library.Library("wisca_fast", "IMPL")
    _fallback_lib.impl("rescale_attention_", _cuda_fallback, "CUDA")


@dataclass
class AttentionTensors:
    """One attention layer's tensors for a rescale. Optional entries may be None."""

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    # Adam moments keyed "q", "k", "v", "o", "bq", "bk", "bv"
    exp_avg: dict = field(default_factory=dict)
    exp_avg_sq: dict = field(default_factory=dict)
    # low-precision shadows of fp32 masters keyed "q", "k", "v", "o"
    shadows: dict = field(default_factory=dict)


def _or_empty(t, like):
    return t if t is not None else like.new_empty(0)


def rescale_attention_(layers: list[AttentionTensors], num_heads: int, num_kv_heads: int, head_dim: int,
                       granularity: str = "tensor", norm: str = "l1", rope_interleaved: bool = False,
                       qk: bool = True, vo: bool = True, clamp: tuple[float, float] | None = None,
                       pow2: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Rescale every layer in one call, in place. Returns the factors: float32 ``[L, 2]`` (s for Q/K,
    t for V/O) or ``[L, 2, num_kv_heads, head_dim]`` for ``granularity="channel"``."""
    if not layers:
        raise ValueError("rescale_attention_: layers is empty; pass one AttentionTensors per attention layer")
    w = [t for lay in layers for t in (lay.wq, lay.wk, lay.wv, lay.wo)]
    anchor = layers[0].wq
    has_bias = any(b is not None for lay in layers for b in (lay.bq, lay.bk, lay.bv))
    has_state = any(lay.exp_avg for lay in layers)
    has_shadow = any(lay.shadows for lay in layers)
    keys = ("q", "k", "v", "o", "bq", "bk", "bv")
    biases = [_or_empty(b, anchor) for lay in layers for b in (lay.bq, lay.bk, lay.bv)] if has_bias else []
    m = [_or_empty(lay.exp_avg.get(k), anchor) for lay in layers for k in keys] if has_state else []
    v = [_or_empty(lay.exp_avg_sq.get(k), anchor) for lay in layers for k in keys] if has_state else []
    sh = [_or_empty(lay.shadows.get(k), anchor) for lay in layers for k in keys[:4]] if has_shadow else []
    lo, hi = clamp if clamp is not None else (0.0, 0.0)
    return torch.ops.wisca_fast.rescale_attention_(w, biases, m, v, sh, num_heads, num_kv_heads, head_dim,
                                                   granularity, norm, rope_interleaved, qk, vo, float(lo),
                                                   float(hi), pow2, float(eps))
