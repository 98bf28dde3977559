"""The tree-verification patch of a Hugging Face model (part of ``c2t_fast.hf``, the room that knows
transformers):

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

from ..kernels import ops
from .adapter import decoder_of

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


# The previous implementation is also kept on the model object (copied with it by copy.deepcopy, never
# written by save_pretrained), so that a deep copy of a patched model can be re-patched, unpatched and run.
_MODEL_ATTR = "_c2t_fast_base_attn_impl"
_HOOK_ATTR = "_c2t_fast_tree_hook"


def _remember(config, base: str) -> None:
    if id(config) not in _BASE_IMPL:
        _BASE_IMPL[id(config)] = base
        weakref.finalize(config, _BASE_IMPL.pop, id(config), None)


def check_tree_call(model, args, kwargs) -> None:
    """Validate a forward call's ``c2t_tree_bits`` against its input before the first layer runs (a
    mismatch found inside attention would leave earlier layers' cache entries grown)."""
    patched = model.config._attn_implementation == ATTN_NAME
    base = getattr(model, _MODEL_ATTR, None)
    if patched and base is not None:
        _remember(model.config, base)  # a deep copy of a patched model: its config is new
    bits = kwargs.get(TREE_KWARG)
    if bits is None:
        return
    if not patched:
        raise RuntimeError(f"{TREE_KWARG} was passed to a model that is not patched (c2t_fast.unpatch was called, "
                           "or its attention implementation was changed); call c2t_fast.patch(model) first")
    ids = kwargs.get("input_ids", args[0] if args else None)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    if x is None:
        raise ValueError(f"a tree pass ({TREE_KWARG}=...) needs input_ids or inputs_embeds")
    B, T = x.shape[0], x.shape[1]
    W = (T + 63) // 64
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int64 or bits.dim() not in (2, 3) or tuple(
            bits.shape[-2:]) != (T, W) or (bits.dim() == 3 and bits.shape[0] != B):
        got = f"{bits.dtype} {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise ValueError(f"{TREE_KWARG} must be int64 [T, {W}] or [B, T, {W}] for the {T} tree tokens of this call "
                         f"(B = {B}); got {got}")
    if bits.device != x.device:
        raise ValueError(f"{TREE_KWARG} is on {bits.device} but the input is on {x.device}")


def _install_tree_check(model) -> None:
    dec = decoder_of(model)
    if getattr(dec, _HOOK_ATTR, None) is None:
        # the decoder shares the model's config and carries _MODEL_ATTR, so it is all the check needs
        handle = dec.register_forward_pre_hook(lambda mod, args, kwargs: check_tree_call(mod, args, kwargs),
                                               with_kwargs=True)
        setattr(dec, _HOOK_ATTR, handle)


def patch(model):
    """Make ``model`` verify token trees. Returns the model.

    Afterwards ``model(input_ids=tree_tokens, position_ids=prefix_len + depth, cache=cache,
    c2t_tree_bits=ancestor_bits)`` runs one tree pass; any call without ``c2t_tree_bits`` is
    computed exactly as before. ``unpatch(model)`` restores the previous implementation. The tree
    bits are checked against the input before any layer runs; after ``unpatch`` a call that still
    passes them is refused rather than silently computed causally.
    """
    check_supported(model)
    config = model.config
    if config._attn_implementation == ATTN_NAME:  # patched already, or a deep copy of a patched model
        base = _BASE_IMPL.get(id(config), getattr(model, _MODEL_ATTR, None))
        if base is None:
            raise RuntimeError(f"the model's attention implementation is {ATTN_NAME!r} but c2t_fast.patch did not "
                               "set it; set it back to 'sdpa' or 'eager' before patching")
    else:
        _register()
        base = config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
    _remember(config, base)
    for m in (model, decoder_of(model)):
        setattr(m, _MODEL_ATTR, base)
    _install_tree_check(model)
    return model


def unpatch(model):
    """Restore the attention implementation ``model`` had before ``patch``. Returns the model."""
    config = model.config
    if config._attn_implementation != ATTN_NAME:
        return model
    base = _BASE_IMPL.get(id(config), getattr(model, _MODEL_ATTR, None))
    if base is None:
        raise RuntimeError(f"the model's attention implementation is {ATTN_NAME!r} but c2t_fast.patch did not set "
                           "it, so the previous implementation is unknown")
    model.set_attn_implementation(base)
    _BASE_IMPL.pop(id(config), None)
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
