"""What every draft is to the engine: ``DraftProtocol``, and ``Draft``, the one base of our drafts, which
holds the bookkeeping they share (the draft KV cache, the stable context and the step's tree slots, the
causal/tree mask and positions of a fed batch, ``commit``/``extend``).

A draft with a restricted vocabulary (``vocab_ids`` not None, FR-Spec style) returns logits over those
ids only: column j is token ``vocab_ids[j]``. Strategies map columns back to tokens
(``TreeDrafter.token_of``). Verification is unchanged (the acceptance rules never read the draft's
distribution), so a restricted draft is exactly as lossless as a full one; it only cannot propose
tokens outside its vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ...hf import adapter as hf


def read_config(path: str):
    """The parsed ``config.json`` of a draft directory (FileNotFoundError / ValueError naming the file)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no draft head at {path!r} (no config.json)")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except ValueError as err:
        raise ValueError(f"draft {cfg_file} is not valid JSON ({err})") from None


@runtime_checkable
class DraftProtocol(Protocol):
    """What the engine and the strategies call on a draft, for one speculative step (batch 1). Positions
    of the draft's KV cache are "slots"; the tree of a step occupies the slots after the stable context.

    All logits are fp32 on the draft's device, which must be the target's (``check_target``)."""

    vocab_ids: torch.Tensor | None  # restricted draft vocabulary (sorted int64 token ids), None: all
    # target layers whose input residual streams the draft reads, concatenated (EAGLE-3); None: the
    # target's post-norm last hidden state (EAGLE-1/2), or nothing for a draft that reads no features
    feature_layers: tuple[int, ...] | None

    def check_target(self, target) -> None:
        """Raise ValueError naming the field when this draft cannot draft for ``target``."""

    def vocab_ids_on(self, device) -> torch.Tensor | None:
        """``vocab_ids`` on ``device`` (None for a full vocabulary)."""

    def prefill(self, ids: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """ids ``int64 [P]`` (the prompt) and the target's features ``[P, F]``: the prompt becomes the
        stable context."""

    def root(self, token: int, feature: torch.Tensor | None) -> torch.Tensor:
        """Feeds the root (the token the target just produced, with the target's feature ``[F]`` before
        it) as tree slot 0 -> next-token logits ``[V]``."""

    def layer_logits(self, tokens: torch.Tensor, parent_slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Feeds a layer of n tree nodes (``tokens int64 [n]``, their parents' slots ``[n]``, ``visible
        bool [n, n_tree + n]``: the tree slots each node sees, its ancestors and itself) -> logits
        ``[n, V]``; the nodes take the next n slots."""

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        """Drops the tree except the root, then appends the accepted nodes ``int64 [a]`` as context
        (for a head, each paired with the target feature ``[a, F]`` of its predecessor)."""

    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        """Appends tokens ``int64 [a]`` the target produced without a tree (plain decoding steps) as
        context, each with the target feature ``[a, F]`` of its predecessor; no tree is pending."""


PROTOCOL_METHODS = ("check_target", "vocab_ids_on", "prefill", "root", "layer_logits", "commit", "extend")


def check_draft(draft) -> None:
    """TypeError naming what ``draft`` lacks of ``DraftProtocol``."""
    if not isinstance(draft, DraftProtocol):
        missing = [m for m in PROTOCOL_METHODS if not callable(getattr(draft, m, None))]
        missing += [a for a in ("vocab_ids", "feature_layers") if not hasattr(draft, a)]
        raise TypeError(f"draft must implement c2t_fast.decoding.drafts.DraftProtocol; {type(draft).__name__} "
                        f"lacks {', '.join(missing)}")


class Draft(nn.Module):
    """The bookkeeping of our drafts: the KV cache, ``n_stable`` (context slots) and ``n_tree`` (this
    step's tree slots), the mask and positions of a fed batch, and ``commit`` / ``extend``. A subclass
    feeds tokens with ``_feed(tokens, features, visible)`` (visible None: a causal chain after the
    context) and returns logits from ``root`` / ``layer_logits``."""

    vocab_ids: torch.Tensor | None = None  # restricted draft vocabulary (sorted token ids), None: all
    feature_layers: tuple[int, ...] | None = None

    def __init__(self):
        super().__init__()
        self.cache = None
        self.n_stable = 0
        self.n_tree = 0

    def _check_device(self, target) -> None:
        """The tree is grown on the draft's device and verified on the target's: they must be one."""
        dev = hf.device_of(target)
        own = next((p for p in self.parameters() if p is not None), None)
        if own is not None and own.device != dev:
            raise ValueError(f"the draft is on {own.device} but the target on {dev}; move the draft with .to({dev!s})")

    def vocab_ids_on(self, device) -> torch.Tensor | None:
        """``vocab_ids`` on ``device`` (copied once per device and vocabulary, not per step)."""
        if self.vocab_ids is None:
            return None
        cached = getattr(self, "_vocab_ids_cache", None)
        if cached is None or cached[0] is not self.vocab_ids or cached[1].device != torch.device(device):
            cached = (self.vocab_ids, self.vocab_ids.to(device))
            self._vocab_ids_cache = cached
        return cached[1]

    def check_target(self, target) -> None:
        """Raise ValueError naming the field when this draft cannot draft for ``target``."""
        self._check_device(target)
        vocab = hf.vocab_size(target)
        mine = getattr(self, "vocab_size", vocab)
        if mine != vocab:
            raise ValueError(f"the draft's vocab_size {mine} differs from the target's ({vocab}); the draft must "
                             "share the target's tokenizer")

    def _slots(self, n: int, visible: torch.Tensor | None, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(additive mask ``[1, 1, n, past + n]``, positions ``[n]``) of n tokens fed after the cache's
        ``past`` slots: a causal chain (``visible`` None) or a tree layer whose nodes see the stable
        context and the tree slots ``visible [n, n_tree + n]``, at position n_stable + depth."""
        if self.cache is None:
            self.cache = hf.new_cache()
        past = self.cache.get_seq_length()
        if visible is None:
            mask = torch.full((n, past + n), torch.finfo(dtype).min, dtype=dtype, device=device)
            return torch.triu(mask, diagonal=past + 1)[None, None], torch.arange(past, past + n, device=device)
        allowed = torch.cat([torch.ones(n, self.n_stable, dtype=torch.bool, device=device), visible.to(device)], -1)
        mask = torch.zeros(n, allowed.shape[1], dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None], (self.n_stable + visible.sum(-1) - 1).to(device)

    def _feed(self, tokens: torch.Tensor, features: torch.Tensor | None, visible: torch.Tensor | None):
        raise NotImplementedError

    def _crop(self, length: int) -> None:
        """Keep the first ``length`` slots of the draft's cache."""
        hf.crop_cache(self.cache, length)

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None = None) -> None:
        """tokens: the accepted nodes a_1..a_tau; features: the target's at root, a_1..a_{tau-1}."""
        self._crop(self.n_stable + 1)  # the root's entry was fed with its true context: keep it
        self.n_stable += 1
        self.n_tree = 0
        if tokens.numel():
            self._feed(tokens, features, None)
            self.n_stable += tokens.numel()

    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None = None) -> None:
        """Context the target produced in plain steps: pairs (token, feature of its predecessor)."""
        self._crop(self.n_stable)
        self.n_tree = 0
        if tokens.numel():
            self._feed(tokens, features, None)
            self.n_stable += tokens.numel()
