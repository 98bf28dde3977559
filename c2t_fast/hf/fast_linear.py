"""Routing a CPU target's linear layers through ``c2t_fast.skinny_linear`` for few-row passes.

A tree verification and a plain decoding step both multiply 1-32 rows by every weight of the model.
On a CPU, ``F.linear`` (MKL) re-packs its operands on every call and costs 1.5-3x its 1-row time at
2-16 rows; the skinny kernel reads each weight row once, so up to 8 tree tokens cost about one step and
16 cost 1.3-1.7x instead of 1.9-2.1x (BENCHMARKS.md, "Verification that costs about one step").
Everything else (training with gradients, many rows, other dtypes or devices) still goes to
``F.linear``, decided per call.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops

_ROUTED = "_c2t_fast_skinny"  # set on every routed nn.Linear


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the skinny kernel when it applies: fp32 on the CPU, at most
    ``ops.SKINNY_MAX_ROWS`` rows, contiguous weight, no gradient needed."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and weight.is_contiguous() and x.numel() <= ops.SKINNY_MAX_ROWS * max(x.shape[-1], 1)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return ops.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _skinny_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return few_row_linear(x, self.weight, self.bias)


def _cpu_fp32_linears(model: nn.Module):
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]


def install_fast_linear(model: nn.Module) -> int:
    """Route every fp32 CPU ``nn.Linear`` of ``model`` through the skinny kernel for calls of at most
    ``ops.SKINNY_MAX_ROWS`` rows without gradients. Weights are used in place (no copy, so later
    weight updates are seen). Idempotent; returns how many layers are routed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = _cpu_fp32_linears(model)
    for m in layers:
        if not getattr(m, _ROUTED, False):
            # an instance attribute shadows nn.Linear.forward; MethodType keeps deepcopy working
            m.forward = types.MethodType(_skinny_forward, m)
            setattr(m, _ROUTED, True)
    return len(layers)


def remove_fast_linear(model: nn.Module) -> int:
    """Undo ``install_fast_linear``; returns how many layers were restored."""
    n = 0
    for m in model.modules():
        if getattr(m, _ROUTED, False):
            del m.forward
            delattr(m, _ROUTED)
            n += 1
    return n


def is_routed(layer: nn.Module) -> bool:
    """Whether this one layer is routed (cheap: for per-call decisions)."""
    return getattr(layer, _ROUTED, False)


def fast_linear_installed(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` is routed through the skinny kernel."""
    return any(getattr(m, _ROUTED, False) for m in model.modules())


@contextmanager
def stock_linear(model: nn.Module):
    """Run ``model`` with torch's own linear layers inside the block (stock ``generate()`` baselines)."""
    had = fast_linear_installed(model)
    if had:
        remove_fast_linear(model)
    try:
        yield model
    finally:
        if had:
            install_fast_linear(model)
