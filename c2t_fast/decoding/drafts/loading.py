"""Loading drafts and the training-free sources from command-line style specifications."""

from __future__ import annotations

import os

from ...hf.adapter import device_of
from ...hf.loading import load_causal_lm
from ...kernels.skinny_linear import fast_linear_installed, install_fast_linear

DEFAULT_DRAFT_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "data",
                                                 "draft_smollm2"))


def load_draft(spec: str | None, target, full_vocab: bool = False):
    """A draft for ``target`` (see ``_load_draft``), on the target's device; when the target's linear
    layers run through the skinny kernel (``kernels.skinny_linear``), the draft's do too. ``"none"``: no draft
    (None: the training-free sources alone draft)."""
    if spec == "none":
        return None
    draft = _load_draft(spec, target, full_vocab).to(device_of(target))
    if fast_linear_installed(target):
        install_fast_linear(draft)
    return draft


def _load_draft(spec: str | None, target, full_vocab: bool = False):
    """A draft for ``target``: a directory written by EagleDraftHead.save_pretrained, a published EAGLE-1/2
    or EAGLE-3 head (``drafts.hub``), a local HF causal LM directory, or "self" (the target drafts for itself: lossless, high acceptance, no speed-up).
    ``full_vocab``: a head saved with a restricted draft vocabulary drafts over the whole vocabulary."""
    from .base import read_config
    from .causal_lm import DraftLM
    from .heads import EagleDraftHead
    from .hub import load_hub_head

    if spec is None:
        if not os.path.isfile(os.path.join(DEFAULT_DRAFT_DIR, "config.json")):
            raise FileNotFoundError(
                "no default draft head is shipped with this build yet; pass --draft PATH (a head directory from "
                "`c2t-fast train-draft`, or a local Hugging Face causal LM sharing the tokenizer) or --draft self "
                "(the target as its own draft: lossless, but no speed-up)")
        spec = DEFAULT_DRAFT_DIR
    if spec == "self":
        return DraftLM(target)
    raw = read_config(spec)
    if isinstance(raw, dict) and raw.get("draft_type") == "eagle_head":
        return EagleDraftHead.from_pretrained(spec, target, full_vocab=full_vocab)
    head = load_hub_head(spec, target)  # a published EAGLE-1/2/3 head: never a causal LM with new weights
    return head if head is not None else DraftLM(load_causal_lm(spec))

