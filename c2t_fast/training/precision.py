"""Which precision a head trains its matmuls in on this device: bf16 autocast (fp32 master weights and
fp32 softmax / losses) where it is measured faster, else fp32. On a CPU with AMX or AVX-512 BF16 a bf16
matmul of a head's shapes runs ~4x fp32; on one without, bf16 is emulated and slower, so "auto" measures
instead of guessing from flags."""

from __future__ import annotations

import contextlib
import functools
import time

import torch

CHOICES = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=None)
def _bf16_faster(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    x, w = torch.randn(512, 576), torch.randn(4096, 576)

    def best(dtype) -> float:
        a, b = x.to(dtype), w.to(dtype)
        a @ b.T  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ b.T
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) < 0.8 * best(torch.float32)


def resolve(choice: str, device: torch.device) -> torch.dtype:
    """torch.float32 or torch.bfloat16 for ``choice`` ("auto": bf16 where measured >= 1.25x faster)."""
    if choice not in CHOICES:
        raise ValueError(f"precision must be one of {CHOICES}, got {choice!r}")
    if choice == "auto":
        return torch.bfloat16 if _bf16_faster(torch.device(device).type) else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


def autocast(dtype: torch.dtype, device: torch.device):
    """The context a training forward runs in: bf16 autocast, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
