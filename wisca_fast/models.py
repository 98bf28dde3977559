"""Where the attention projections of a Hugging Face model live: the one module of wisca_fast that
knows model structure (module names, config fields, peft LoRA wrappers, fused QKV layouts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# HF rotary embeddings use the rotate_half layout (pairs (j, j + D/2)) in every supported family.
ROPE_INTERLEAVED = False


@dataclass
class LoraAdapter:
    A: nn.Linear  # [r, in]
    B: nn.Linear  # [out, r]
    scaling: float


@dataclass
class Projection:
    """One of q/k/v/o: the base nn.Linear, a row slice when it is part of a fused QKV weight, and any
    active peft LoRA adapters on it."""

    linear: nn.Linear
    rows: slice | None = None
    lora: list[LoraAdapter] = field(default_factory=list)

    def weight(self):
        w = self.linear.weight
        return w if self.rows is None else w[self.rows]

    def bias(self):
        b = self.linear.bias
        if b is None:
            return None
        return b if self.rows is None else b[self.rows]


@dataclass
class AttentionLayer:
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    qk_norm: bool  # q/k RMS-normed after the projection (Gemma-3, Qwen3, OLMo-2): Q/K scaling is absorbed


@dataclass
class AttentionSpec:
    layers: list[AttentionLayer]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_interleaved: bool = ROPE_INTERLEAVED


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _projection(module: nn.Module, rows: slice | None = None) -> Projection:
    """nn.Linear, or a peft LoRA layer wrapping one (``base_layer`` + ``lora_A``/``lora_B``)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"expected an nn.Linear projection, got {type(module).__name__}")
        return Projection(module, rows)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"LoRA base layer is {type(base).__name__} (quantized?); WISCA needs a float nn.Linear")
    adapters = []
    for name in getattr(module, "active_adapters", []) or []:
        if name in module.lora_A:
            adapters.append(LoraAdapter(module.lora_A[name], module.lora_B[name], float(module.scaling[name])))
    return Projection(base, rows, adapters)


def _config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "text_config", None) or cfg


def find_attention(model: nn.Module) -> AttentionSpec:
    """Every decoder attention block's projections, in layer order. Raises ValueError naming what was
    found when the model has no attention block WISCA knows."""
    model = _unwrap_peft(model)
    cfg = _config(model)
    layers, seen = [], []
    for name, mod in model.named_modules():
        children = dict(mod.named_children())
        if {"q_proj", "k_proj", "v_proj", "o_proj"} <= children.keys():
            layers.append(AttentionLayer(_projection(mod.q_proj), _projection(mod.k_proj), _projection(mod.v_proj),
                                         _projection(mod.o_proj), qk_norm=hasattr(mod, "q_norm")))
        elif {"qkv_proj", "o_proj"} <= children.keys():  # fused [Q; K; V] rows (Phi-3)
            layers.append(("fused", mod))
        elif "attn" in name.split(".")[-1] or "attention" in name.split(".")[-1]:
            seen.append(f"{name} ({type(mod).__name__}: {', '.join(children) or 'no children'})")
    if cfg is None or not layers:
        raise ValueError("wisca_fast supports attention blocks with q_proj/k_proj/v_proj/o_proj (Llama, Qwen2, "
                         "Mistral, Gemma, Gemma-3) or a fused [Q; K; V] qkv_proj (Phi-3); found: "
                         + ("; ".join(seen[:6]) or f"no attention modules in {type(model).__name__}"))
    Hq = cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or Hq
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(f"partial rotary embeddings (factor {cfg.partial_rotary_factor}) are not supported")
    out = []
    for lay in layers:
        if isinstance(lay, tuple):
            mod = lay[1]
            QR, KR = Hq * D, Hkv * D
            out.append(AttentionLayer(_projection(mod.qkv_proj, slice(0, QR)),
                                      _projection(mod.qkv_proj, slice(QR, QR + KR)),
                                      _projection(mod.qkv_proj, slice(QR + KR, QR + 2 * KR)),
                                      _projection(mod.o_proj), qk_norm=hasattr(mod, "q_norm")))
            if out[-1].q.lora:
                raise ValueError("LoRA on a fused qkv_proj is not supported (the adapter spans Q, K and V)")
        else:
            out.append(lay)
    return AttentionSpec(out, Hq, Hkv, D)
