"""The one door into wisca_fast's compiled code: ``torch.ops.wisca_fast.rescale_attention_`` (C++ CPU
kernel, CUDA kernel when compiled, fake kernel) and a Python-friendly wrapper."""

from __future__ import annotations

import logging
import torch

from . import reference
from .layout import AttentionTensors, OpLists  # noqa: F401  (AttentionTensors: part of this door)

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


def rescale_attention_(layers: list[AttentionTensors], num_heads: int, num_kv_heads: int, head_dim: int,
                       granularity: str = "tensor", norm: str = "l1", rope_interleaved: bool = False,
                       qk: bool = True, vo: bool = True, clamp: tuple[float, float] | None = None,
                       pow2: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Rescale every layer in one call, in place. Returns the factors: float32 ``[L, 2]`` (s for Q/K,
    t for V/O) or ``[L, 2, num_kv_heads, head_dim]`` for ``granularity="channel"``."""
    if not layers:
        raise ValueError("rescale_attention_: layers is empty; pass one AttentionTensors per attention layer")
    t = OpLists.pack(layers)
    lo, hi = clamp if clamp is not None else (0.0, 0.0)
    return torch.ops.wisca_fast.rescale_attention_(t.weights, t.biases, t.exp_avg, t.exp_avg_sq, t.shadows,
                                                   num_heads, num_kv_heads, head_dim,
                                                   granularity, norm, rope_interleaved, qk, vo, float(lo),
                                                   float(hi), pow2, float(eps))
