"""What every draft-head training run is configured by: the optimiser schedule and the checkpoints. The
EAGLE-1 (``draft_head.DraftTrainConfig``), EAGLE-3 (``eagle3_head.Eagle3TrainConfig``) and self-distilled
EAGLE-3 (``selfdistill_train.SelfDistillTrainConfig``) configs extend it with their own fields (and their
own defaults where a recipe differs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HeadTrainConfig:
    epochs: int = 2
    lr: float = 1e-3
    warmup: int = 20  # optimizer steps of linear warm-up, then cosine decay to lr / 10
    grad_clip: float = 0.5
    accumulate: int = 4  # sequences per optimizer step
    save_every: int = 50  # optimizer steps between checkpoints
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the field (``<Config>.<field>``) for a value no run can use."""
        name = type(self).__name__
        for f in ("epochs", "accumulate", "save_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")
        if self.warmup < 0:
            raise ValueError(f"{name}.warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0 or not self.grad_clip > 0:
            raise ValueError(f"{name}: lr and grad_clip must be > 0, got {self.lr}, {self.grad_clip}")
