"""skinny_linear: a CPU GEMM for few rows (tree verification, plain decoding steps), and the routing of a
model's ``nn.Linear`` layers through it.

A tree verification and a plain decoding step both multiply 1-32 rows by every weight of the model.
On a CPU, ``F.linear`` (MKL) re-packs its operands on every call and costs 1.5-3x its 1-row time at
2-16 rows; the skinny kernel (``csrc/c2t/skinny_linear_cpu.cpp``, an AVX2/FMA micro-kernel; schema in
``csrc/c2t/ops.cpp``) reads each weight row once, so up to 8 tree tokens cost about one step and 16 cost
1.3-1.7x instead of 1.9-2.1x (BENCHMARKS.md, "Verification that costs about one step"). The routing
works on any ``nn.Module`` (no model family is known here): everything else (training with gradients,
many rows, other dtypes or devices) still goes to ``F.linear``, decided per call.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import library  # noqa: F401  (loads the op's schema before its fake registers)


@torch.library.register_fake("c2t_fast::skinny_linear")
def _skinny_linear_fake(x, weight, bias=None):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: "skinny_linear: x [M, K] and weight [N, K]")
    return x.new_empty((x.shape[0], weight.shape[0]))


def _skinny_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _skinny_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = grad @ weight if ctx.needs_input_grad[0] else None
    gw = grad.T @ x if ctx.needs_input_grad[1] else None
    gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


torch.library.register_autograd("c2t_fast::skinny_linear", _skinny_linear_backward, setup_context=_skinny_linear_setup)

# Rows up to which hf.fast_linear routes a layer here: at 32 rows the whole verification pass was as
# fast as or faster than with F.linear in three runs, at 64 slower in one of them (BENCHMARKS.md,
# "Verification that costs about one step"). The op itself takes any number of rows.
SKINNY_MAX_ROWS = 32


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few rows on the CPU, reading each weight row from memory once.

    x ``float32 [..., K]`` (any leading shape, unit stride along K), weight ``float32 [N, K]``
    contiguous, bias ``float32 [N]`` or None -> ``float32 [..., N]``. Agrees with ``F.linear`` to fp32
    rounding (a different summation order), not bit for bit. Meant for ``x`` of up to
    ``SKINNY_MAX_ROWS`` rows; more rows are correct but not faster than ``F.linear``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"skinny_linear: x must be a tensor [..., K], got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else ' of rank 0'}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.ops.c2t_fast.skinny_linear(x2, weight, bias)
    return y.view(*lead, y.shape[-1])


_ROUTED = "_c2t_fast_skinny"  # set on every routed nn.Linear


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the skinny kernel when it applies: fp32 on the CPU, at most
    ``SKINNY_MAX_ROWS`` rows, contiguous weight, no gradient needed."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and weight.is_contiguous() and x.numel() <= SKINNY_MAX_ROWS * max(x.shape[-1], 1)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _skinny_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return few_row_linear(x, self.weight, self.bias)


def _cpu_fp32_linears(model: nn.Module):
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]


def install_fast_linear(model: nn.Module) -> int:
    """Route every fp32 CPU ``nn.Linear`` of ``model`` through the skinny kernel for calls of at most
    ``SKINNY_MAX_ROWS`` rows without gradients. Weights are used in place (no copy, so later
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
