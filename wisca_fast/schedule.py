"""When to apply WISCA: at initialisation and every N optimizer steps (paper: 250)."""

from __future__ import annotations

import logging

import torch

from .apply import apply

log = logging.getLogger("wisca_fast")


def _summary(factors: torch.Tensor) -> dict:
    f = factors.float()
    s, t = (f[:, 0], f[:, 1]) if f.dim() >= 2 and f.shape[1] == 2 else (f, f)
    return {"wisca/s_mean": s.mean().item(), "wisca/s_min": s.min().item(), "wisca/s_max": s.max().item(),
            "wisca/t_mean": t.mean().item(), "wisca/t_min": t.min().item(), "wisca/t_max": t.max().item()}


class WiscaScheduler:
    """For hand-written loops: call ``step()`` after every ``optimizer.step()``.

    Applies at construction when ``at_init`` and then every ``every`` optimizer steps (``every=0``:
    init only). ``history`` keeps (step, factor summary) pairs; every transition is also logged.
    """

    def __init__(self, model, optimizer=None, every: int = 250, at_init: bool = True, **apply_kwargs):
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.model, self.optimizer, self.every, self.kwargs = model, optimizer, every, apply_kwargs
        self.steps = 0
        self.history: list[tuple[int, dict]] = []
        if at_init:
            self.transition()

    def transition(self) -> torch.Tensor:
        factors = apply(self.model, self.optimizer, **self.kwargs)
        summary = _summary(factors)
        self.history.append((self.steps, summary))
        log.info("WISCA transition at step %d: %s", self.steps, summary)
        return factors

    def step(self) -> torch.Tensor | None:
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            return self.transition()
        return None


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency of the package
        return object
    return TrainerCallback


class WiscaCallback(_callback_base()):
    """transformers ``Trainer`` callback: WISCA at the start of training (``at_init``) and every
    ``every`` optimizer steps (``state.global_step`` counts optimizer steps, not micro-batches, so
    gradient accumulation is handled). Factor summaries go to the Trainer's log history."""

    def __init__(self, every: int = 250, at_init: bool = True, **apply_kwargs):
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.every, self.at_init, self.kwargs = every, at_init, apply_kwargs
        self.transitions: list[int] = []

    def _run(self, state, model, optimizer):
        factors = apply(model, optimizer, **self.kwargs)
        summary = _summary(factors)
        self.transitions.append(state.global_step)
        state.log_history.append({**summary, "step": state.global_step})
        log.info("WISCA transition at step %d: %s", state.global_step, summary)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.at_init and state.global_step == 0:
            self._run(state, model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.every and state.global_step > 0 and state.global_step % self.every == 0:
            self._run(state, model, optimizer)
