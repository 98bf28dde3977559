"""Hugging Face integration of c2t_fast: the one module that knows transformers' objects.

For now: applying ``compact_kv`` to a transformers ``DynamicCache``. The tree-attention patch
(``c2t_fast.patch``) lands here too.
"""

from __future__ import annotations

import torch

from . import ops


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
