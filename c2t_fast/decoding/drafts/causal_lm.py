"""``DraftLM``: any small Hugging Face causal LM that shares the target's tokenizer, fed a tree with a 4D
ancestor mask (or the target itself, ``--draft self``)."""

from __future__ import annotations

import torch

from ...hf import adapter as hf
from .base import Draft


class DraftLM(Draft):
    """A small HF causal LM sharing the target's tokenizer; trees are fed with a 4D ancestor mask."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self._runner = hf.CausalLMRunner(model)

    @property
    def vocab_size(self) -> int:
        return self._runner.vocab_size

    def _feed(self, tokens, features, visible):
        n = tokens.numel()
        param = next(self.model.parameters())
        mask, pos = self._slots(n, visible, param.dtype, param.device)
        return self._runner.logits(tokens.view(n).to(param.device), mask, pos, self.cache)

    def prefill(self, ids: torch.Tensor, hidden=None) -> None:
        self.cache = None
        self.n_tree = 0
        self._feed(ids, None, None)
        self.n_stable = ids.numel()

    def root(self, token: int, feature=None) -> torch.Tensor:
        out = self._feed(torch.tensor([token]), None, torch.ones(1, 1, dtype=torch.bool))
        self.n_tree = 1
        return out[0]

    def layer_logits(self, tokens, parent_slots, visible) -> torch.Tensor:
        out = self._feed(tokens, None, visible)
        self.n_tree += tokens.numel()
        return out
