"""decode_attention: one new token per sequence attending its own cached keys, for batched decoding on
the CPU (the self-distillation generator's ``hf.static_batch``). C++ kernel in
``csrc/c2t/decode_attention_cpu.cpp`` (schema in ``csrc/c2t/ops.cpp``); this module holds its argument checks, fake
kernel and the explicit CUDA fallback (the reference, logged once: on a GPU the generator uses SDPA)."""

from __future__ import annotations

import math

import torch

from . import reference
from .library import IMPL, warn_fallback

MAX_GROUP = 16  # query heads per KV head (the kernel's register budget)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(q, k, v, lengths, scale) -> None:
    """ValueError naming the argument for anything the kernel refuses (lengths' values are checked by
    the kernel itself, which reads them)."""
    op = "decode_attention"
    for name, t in (("q", q), ("k", k), ("v", v), ("lengths", lengths)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 3 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q must be [B, Hq, D] and k, v [B, Hkv, C, D]; got ranks {q.dim()}, {k.dim()}, "
                         f"{v.dim()}")
    B, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, Hkv, C, D={D}]")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv or Hq // Hkv > MAX_GROUP:
        raise ValueError(f"{op}: Hq = {Hq} must be a multiple of Hkv = {Hkv}, at most {MAX_GROUP} per KV head")
    if not 1 <= D <= 256:
        raise ValueError(f"{op}: head_dim must be in 1..256, got {D}")
    if q.dtype not in DTYPES or k.dtype not in DTYPES or v.dtype != k.dtype:
        raise ValueError(f"{op}: q, k, v must be fp32/bf16/fp16 (k and v alike), got {q.dtype}, {k.dtype}, {v.dtype}")
    if lengths.dtype != torch.int64 or lengths.shape != (B,):
        raise ValueError(f"{op}: lengths must be int64 [B] = [{B}], got {lengths.dtype} {tuple(lengths.shape)}")
    if len({t.device for t in (q, k, v, lengths)}) != 1:
        raise ValueError(f"{op}: q, k, v, lengths must be on one device")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


@torch.library.register_fake("c2t_fast::decode_attention")
def _fake(q, k, v, lengths, scale):
    check(q, k, v, lengths, scale)
    return q.new_empty(q.shape)


def _cuda_fallback(q, k, v, lengths, scale):
    check(q, k, v, lengths, scale)
    warn_fallback("decode_attention", "there is no CUDA kernel of this op; hf.static_batch uses SDPA on a GPU")
    if bool(((lengths < 1) | (lengths > k.shape[2])).any()):
        raise ValueError(f"decode_attention: every length must be in 1..{k.shape[2]}")
    return reference.decode_attention(q, k, v, lengths, scale)


IMPL.impl("decode_attention", _cuda_fallback, "CUDA")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its own cache.

    q ``[B, Hq, D]`` (fp32/bf16/fp16), k and v ``[B, Hkv, C, D]`` (fp32/bf16/fp16, the same dtype; any
    strides with unit stride along D: a layer's view of a static cache), lengths int64 ``[B]`` in
    ``1..C`` (sequence b attends positions ``0 .. lengths[b] - 1``), ``scale`` (default ``D ** -0.5``)
    -> ``[B, Hq, D]`` in q's dtype, accumulated in fp32. Query head h reads KV head ``h // (Hq / Hkv)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    check(q, k, v, lengths, scale)
    return torch.ops.c2t_fast.decode_attention(q, k, v, lengths, scale)
