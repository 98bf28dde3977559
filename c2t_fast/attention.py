"""Hugging Face integration of c2t_fast: the one module that knows transformers' objects.

- ``patch(model)`` / ``unpatch(model)``: register our attention under ``ATTN_NAME`` with
  transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` and switch the model to it.
  Outside tree verification it delegates to the model's previous implementation (same function);
  a forward call that carries ``c2t_tree_bits=<ancestor bits>`` runs the tree through
  ``c2t_fast::tree_attention`` instead. No modeling file or class is modified.
- ``compact_dynamic_cache``: ``compact_kv`` applied to a ``DynamicCache``.
"""

from __future__ import annotations

import sys
import weakref

import torch

from . import ops

ATTN_NAME = "c2t_tree"
TREE_KWARG = "c2t_tree_bits"
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
_NOT_IMPLEMENTED = {
    "gemma3": "Gemma-3 interleaves sliding-window layers whose cache is a ring buffer and whose window "
              "would have to be applied per tree query; tree verification does not handle them",
    "gemma3_text": "Gemma-3 interleaves sliding-window layers whose cache is a ring buffer and whose "
                   "window would have to be applied per tree query; tree verification does not handle them",
    "gemma2": "Gemma-2 uses attention logit soft-capping and sliding-window layers, which tree attention "
              "does not implement",
}

# id(config) -> the attention implementation the model had before patch(); cleaned when the
# config dies. Kept off the config object so that save_pretrained never writes it.
_BASE_IMPL: dict[int, str] = {}


def _base_impl(config) -> str:
    try:
        return _BASE_IMPL[id(config)]
    except KeyError:
        raise RuntimeError(f"attention implementation {ATTN_NAME!r} is set on a model that c2t_fast.patch() "
                           "did not patch (a copy of a patched model? unpatch before copying, then patch each "
                           "model)") from None


def _tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    bits = kwargs.pop(TREE_KWARG, None)
    if bits is None:
        return _delegate(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                 **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("tree verification does not support sliding-window or soft-capped attention")
    T = query.shape[2]
    out = ops.tree_attention(query, key, value, bits, key.shape[2] - T, scaling)
    return out, None


def _delegate(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _base_impl(module.config)
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _tree_mask(*args, config=None, **kwargs):
    """The mask of the previous implementation: it is what prefill and plain decoding use. A tree
    pass ignores it (prefix fully visible, tree by ancestor bits)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = _base_impl(config)
    fn = ALL_MASK_ATTENTION_FUNCTIONS[name if name in ALL_MASK_ATTENTION_FUNCTIONS else "eager"]
    return fn(*args, config=config, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _tree_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _tree_mask)


def check_supported(model) -> None:
    """Raise a clear error when ``model`` is not a family whose tree verification is exact."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    if family in _NOT_IMPLEMENTED:
        raise NotImplementedError(f"c2t_fast cannot verify trees on {family}: {_NOT_IMPLEMENTED[family]}")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"c2t_fast supports the model families {', '.join(SUPPORTED_FAMILIES)}; got "
                         f"{family!r} ({type(model).__name__})")
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = sliding is not None and (family != "qwen2" or getattr(config, "use_sliding_window", False))
    if uses_sliding or "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise NotImplementedError(f"{family} with sliding-window attention (window {sliding}) is not supported: "
                                  "tree queries would need a per-position window and the cache is a ring buffer")


def patch(model):
    """Make ``model`` verify token trees. Returns the model.

    Afterwards ``model(input_ids=tree_tokens, position_ids=prefix_len + depth, cache=cache,
    c2t_tree_bits=ancestor_bits)`` runs one tree pass; any call without ``c2t_tree_bits`` is
    computed exactly as before. ``unpatch(model)`` restores the previous implementation.
    """
    check_supported(model)
    config = model.config
    if config._attn_implementation == ATTN_NAME:
        return model
    _register()
    _BASE_IMPL[id(config)] = config._attn_implementation
    weakref.finalize(config, _BASE_IMPL.pop, id(config), None)
    model.set_attn_implementation(ATTN_NAME)
    return model


def unpatch(model):
    """Restore the attention implementation ``model`` had before ``patch``. Returns the model."""
    config = model.config
    if config._attn_implementation != ATTN_NAME:
        return model
    model.set_attn_implementation(_BASE_IMPL.pop(id(config)))
    return model


def is_patched(model) -> bool:
    return model.config._attn_implementation == ATTN_NAME


def dynamic_cache_tensors(cache) -> list[torch.Tensor]:
    """The K and V tensors ``[B, Hkv, S, D]`` of every layer of a transformers ``DynamicCache``
    (transformers >= 4.56 layout: ``cache.layers[i].keys / .values``), K before V per layer."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"expected a transformers DynamicCache with .layers (transformers >= 4.56), got "
                        f"{type(cache).__name__}")
    tensors = []
    for i, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError(
                f"cache layer {i} is a sliding-window layer; its slots are a ring buffer, so the accepted "
                "path cannot be compacted by position")
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            raise ValueError(f"cache layer {i} holds no [B, Hkv, S, D] keys/values yet (run a forward first)")
        tensors += [keys, values]
    return tensors


def compact_dynamic_cache(cache, prefix_len: int, accepted: torch.Tensor) -> int:
    """Keep the accepted tree path in ``cache``: its K/V rows move right after ``prefix_len`` (one
    ``compact_kv`` call for all layers) and the cache is cropped to the new length, returned."""
    tensors = dynamic_cache_tensors(cache)
    new_len = ops.compact_kv(tensors, prefix_len, accepted)
    removed = tensors[0].shape[2] - new_len
    if removed:
        cache.crop(-removed)  # negative = drop that many trailing slots, in every transformers version
    return new_len
