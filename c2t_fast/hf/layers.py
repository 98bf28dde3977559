"""The transformers building blocks of our EAGLE-style draft head: a one-layer Llama config with the
target's widths, its decoder layer and rotary embedding."""

from __future__ import annotations

from torch import nn

from .adapter import cache_kwarg

# The target config fields a one-layer Llama head copies (whatever the target's family).
_HEAD_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling",
                "rope_parameters", "hidden_act")


def head_config(config):
    """A one-layer ``LlamaConfig`` with the target's widths, heads and RoPE; a one-layer Llama config
    is used as it is. Attention runs through SDPA (the head passes explicit tree masks)."""
    from transformers import LlamaConfig

    if isinstance(config, LlamaConfig) and config.num_hidden_layers == 1:
        cfg = config
    else:
        fields = {k: getattr(config, k) for k in _HEAD_FIELDS if getattr(config, k, None) is not None}
        cfg = LlamaConfig(**fields, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    return cfg


def head_config_from_dict(raw: dict):
    """``head_config`` of a config saved with ``config.to_dict()`` (TypeError/ValueError/KeyError when
    it is not a usable model config)."""
    from transformers import LlamaConfig

    return head_config(LlamaConfig.from_dict(raw))


def decoder_layer(cfg) -> tuple[nn.Module, nn.Module, str]:
    """(decoder layer, rotary embedding, name of the layer's cache argument) for a ``head_config``."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    return layer, LlamaRotaryEmbedding(cfg), cache_kwarg(layer.forward)
