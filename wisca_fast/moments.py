"""Adam-family optimizer state across a WISCA transition: what ``optimizer_state`` does to a rescaled
parameter's moments, for every path (the fused op, LoRA / sharded weights, adapter balancing).

A parameter multiplied element-wise by c keeps the optimizer's next steps unchanged when
exp_avg /= c and exp_avg_sq /= c^2 ("rescale"); "reset" zeroes the moments (and AMSGrad's running
maximum); "keep" leaves them.
"""

from __future__ import annotations

import torch

OPTIMIZER_STATES = ("rescale", "keep", "reset")


def adam_moments(optimizer, param) -> tuple | None:
    """(exp_avg, exp_avg_sq, max_exp_avg_sq or None) of ``param``, or None before its first step (or
    without an optimizer)."""
    if optimizer is None:
        return None
    state = optimizer.state.get(param)
    if not state:
        return None
    return state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq")


def check_optimizer(optimizer, optimizer_state: str) -> None:
    """Refuse, before anything is scaled, a mode or an optimizer whose state cannot follow the transition."""
    if optimizer_state not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {optimizer_state!r}")
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        if group.get("amsgrad") and optimizer_state == "rescale":
            raise ValueError(f"optimizer_state='rescale' does not support AMSGrad ({type(optimizer).__name__} with "
                             "amsgrad=True keeps max_exp_avg_sq, a running maximum that no per-element rescale "
                             "keeps equal to the untransformed run); use optimizer_state='reset' or 'keep'")
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and ("exp_avg" not in state or "exp_avg_sq" not in state):
                raise ValueError(f"optimizer_state handling supports Adam-family state (exp_avg, exp_avg_sq); "
                                 f"{type(optimizer).__name__} holds {sorted(state)}")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def reset(moments) -> None:
    """Zero every moment tensor (the fused path resets after the op has run)."""
    for t in moments or ():
        if t is not None:
            t.zero_()


def follow_scale(optimizer, param, optimizer_state: str, mult: torch.Tensor, rows=None) -> None:
    """Make ``param``'s moments follow ``param *= mult`` (``mult`` already shaped to broadcast over the
    local tensor, or over ``local[rows]`` when ``rows`` selects a fused projection's slice)."""
    mom = adam_moments(optimizer, param)
    if mom is None or optimizer_state == "keep":
        return
    if optimizer_state == "reset":
        reset(mom)
        return
    for t, power in ((mom[0], 1), (mom[1], 2)):
        local = _local(t) if rows is None else _local(t)[rows]
        local.copy_((local.double() / mult ** power).to(local.dtype))
