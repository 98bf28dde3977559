"""wisca_fast: output-preserving attention weight rescaling for training (WISCA, arXiv:2508.16676).

- ``wisca_fast.apply(model, optimizer=None, granularity="tensor")``: one transition of every attention
  layer (fused op; LoRA, fused QKV, QK-norm models, DDP and FSDP2 handled), returns the factors.
- ``WiscaCallback(every=250)`` for the transformers Trainer, ``WiscaScheduler`` for hand-written loops.
- ``torch.ops.wisca_fast.rescale_attention_``: the fused multi-layer op (``wisca_fast.ops``).
"""

from . import ops
from .apply import apply
from .models import find_attention
from .schedule import WiscaCallback, WiscaScheduler

__version__ = "0.1.0"

__all__ = ["WiscaCallback", "WiscaScheduler", "apply", "find_attention", "ops"]
