"""The transformers building blocks of our EAGLE-style draft head: a one-layer Llama config with the
target's widths, its decoder layer and rotary embedding."""

from __future__ import annotations

import torch
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


def decoder_layer(cfg, input_norm: bool = True) -> tuple[nn.Module, nn.Module, str]:
    """(decoder layer, rotary embedding, name of the layer's cache argument) for a ``head_config``.
    ``input_norm=False``: the layer's input RMSNorm is the identity (EAGLE-1/2's published heads)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    if not input_norm:
        layer.input_layernorm = nn.Identity()
    return layer, rotary_embedding(cfg), cache_kwarg(layer.forward)


class StackedLayer(nn.Module):
    """A plain Llama decoder layer stacked after a head's first layer (``layer_idx`` >= 1 in the head's
    cache): ``forward(hidden, mask, position_embeddings, cache) -> hidden``."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        self.layer = LlamaDecoderLayer(cfg, layer_idx=layer_idx)
        self._cache_kw = cache_kwarg(self.layer.forward)

    def forward(self, hidden, attention_mask, position_embeddings, cache=None):
        kw = {self._cache_kw: cache, "use_cache": True} if cache is not None else {}
        out = self.layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings, **kw)
        return out[0] if isinstance(out, tuple) else out


def rotary_embedding(cfg) -> nn.Module:
    """Llama RoPE for ``cfg``: ``rotary(x, position_ids) -> (cos, sin)``."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(cfg)


def rms_norm(hidden_size: int, eps: float) -> nn.Module:
    """The Llama RMSNorm (weights named ``weight``)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(hidden_size, eps=eps)


class Eagle3MidLayer(nn.Module):
    """EAGLE-3's decoder layer: attention reads ``[input_layernorm(token embedding); hidden_norm(hidden)]``
    (q/k/v over 2H inputs), the residual is the hidden input, then the Llama MLP. Parameter names are
    the published checkpoints' (``input_layernorm``, ``hidden_norm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``)."""

    def __init__(self, cfg):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        base = LlamaDecoderLayer(cfg, layer_idx=0)
        H, attn = cfg.hidden_size, base.self_attn
        bias = getattr(cfg, "attention_bias", False)
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(2 * H, old.out_features, bias=bias))
        self.self_attn, self.mlp = attn, base.mlp
        self.input_layernorm, self.post_attention_layernorm = base.input_layernorm, base.post_attention_layernorm
        self.hidden_norm = rms_norm(H, cfg.rms_norm_eps)
        self._cache_kw = cache_kwarg(attn.forward)

    def forward(self, embeds, hidden, attention_mask, position_embeddings, cache=None):
        """embeds, hidden ``[1, n, H]`` -> the layer's output ``[1, n, H]`` (before the head's final norm)."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], -1)
        kw = {self._cache_kw: cache} if cache is not None else {}
        attn = self.self_attn(hidden_states=x, position_embeddings=position_embeddings,
                              attention_mask=attention_mask, **kw)[0]
        h = hidden + attn
        return h + self.mlp(self.post_attention_layernorm(h))
