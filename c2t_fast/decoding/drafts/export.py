"""An EAGLE-3 head written in the layouts serving engines load: SGLang's (``LlamaForCausalLMEagle3``) and
vLLM's speculators format (``Eagle3Speculator``). ``hub.load_eagle3`` reads both back.

The two disagree on what ``eagle_aux_hidden_state_layer_ids`` means, and that is most of this module:
- here (and in speculators) an id i is the residual stream *entering* target layer i (transformers'
  ``hidden_states[i]``); the default is (2, N/2, N-3);
- SGLang's explicit ids are layer *outputs*: it adds 1, and (since sgl-project/sglang#25454) only when the
  first id is 1; with no ids it uses (2, N/2, N-3) in our convention. So the SGLang export omits default
  ids and writes ``i - 1`` for others whose first id is 2; any other set cannot be said to SGLang.
SGLang also builds extra decoder layers without the midlayer's residual and takes the embedding as LM head
when ``tie_word_embeddings`` is true, and vLLM applies the hidden norm before the residual unless
``norm_before_residual`` is false: each export writes what makes the engine compute this head's function,
or refuses the head with the reason.
"""

from __future__ import annotations

import json
import os

import torch

from .eagle3 import Eagle3DraftHead, eagle3_feature_layers

FORMATS = ("sglang", "speculators")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sglang_layer_ids(feature_layers, num_target_layers: int) -> list[int] | None:
    """The ``eagle_aux_hidden_state_layer_ids`` SGLang reads as ``feature_layers`` (None: omit the field,
    SGLang's default is ours); ValueError when SGLang's rule cannot express them."""
    ids = [int(i) for i in feature_layers]
    if tuple(ids) == eagle3_feature_layers(num_target_layers):
        return None
    if ids[0] != 2:
        raise ValueError(f"feature layers {ids}: SGLang adds 1 to explicit layer ids only when the first is 1, so "
                         "only sets starting at layer 2 (or the default) can be exported to it")
    return [i - 1 for i in ids]


def export_head(head: Eagle3DraftHead, out_dir: str, fmt: str, num_target_layers: int, dtype: str = "bf16",
                speculative_tokens: int = 3, verifier: str | None = None,
                verifier_architectures: tuple[str, ...] = ("LlamaForCausalLM",)) -> list[str]:
    """Write ``head`` to ``out_dir`` (new or empty) in ``fmt`` ("sglang" or "speculators"); returns the
    files written. ``num_target_layers``: the target's layer count (default feature layers are omitted for
    SGLang); ``dtype``: "bf16" / "fp16" / "fp32" for the float tensors; ``speculative_tokens`` and
    ``verifier`` (the target's hub id or path): the speculators config's proposal and verifier. Every
    argument is checked before anything is written."""
    if not isinstance(head, Eagle3DraftHead):
        raise ValueError(f"head: only EAGLE-3 heads can be exported (SGLang and vLLM serve EAGLE-3 heads in these "
                         f"layouts), got {type(head).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not isinstance(speculative_tokens, int) or speculative_tokens < 1:
        raise ValueError(f"speculative_tokens must be an int >= 1, got {speculative_tokens!r}")
    if not isinstance(num_target_layers, int) or num_target_layers < 1:
        raise ValueError(f"num_target_layers must be an int >= 1, got {num_target_layers!r}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"out_dir {out_dir!r} exists and is not an empty directory")
    if fmt == "sglang":
        if head.extra_layers:
            raise ValueError(f"head: {1 + len(head.extra_layers)} decoder layers; SGLang's EAGLE-3 model builds "
                             "layers after the first without its residual, so only one-layer heads export to it")
        ids = sglang_layer_ids(head.feature_layers, num_target_layers)
    else:
        if head.fc_bias:
            raise ValueError("head: fc has a bias, which the speculators format has no tensor for")
        if verifier is None:
            raise ValueError("verifier: the speculators format names the target (a hub id or path)")
    cast = DTYPES[dtype]
    state = _weights(head, fmt, cast)
    config = _sglang_config(head, ids) if fmt == "sglang" else _speculators_config(
        head, speculative_tokens, verifier, list(verifier_architectures))

    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    return ["config.json", "model.safetensors"]


def _weights(head: Eagle3DraftHead, fmt: str, cast: torch.dtype) -> dict[str, torch.Tensor]:
    def f(t):
        return t.detach().cpu().to(cast).contiguous()

    state = {}
    first = "midlayer." if fmt == "sglang" else "layers.0."
    for k, v in head.midlayer.state_dict().items():
        state[first + k] = f(v)
    for i, layer in enumerate(head.extra_layers):  # speculators only (refused for SGLang)
        for k, v in layer.layer.state_dict().items():
            state[f"layers.{i + 1}.{k}"] = f(v)
    state["fc.weight"] = f(head.fc.weight)
    if head.fc.bias is not None:
        state["fc.bias"] = f(head.fc.bias)
    state["norm.weight"] = f(head.norm.weight)
    state["lm_head.weight"] = f(head.lm_head.weight)
    if head.own_embedding:
        state["embed_tokens.weight"] = f(head.embed_tokens.weight)
    state["d2t"] = head.d2t.detach().cpu().to(torch.int64).contiguous()
    state["t2d"] = head.t2d_mask().cpu().contiguous()
    return state


def _llama_fields(head: Eagle3DraftHead) -> dict:
    c = head.config
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 10000.0)})
    return {"model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None) or
            c.hidden_size // c.num_attention_heads, "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps,
            "max_position_embeddings": c.max_position_embeddings, "rope_theta": rope.get("rope_theta", 10000.0),
            "rope_parameters": rope, "attention_bias": bool(getattr(c, "attention_bias", False)),
            "mlp_bias": bool(getattr(c, "mlp_bias", False)), "tie_word_embeddings": False,
            "num_hidden_layers": 1 + len(head.extra_layers)}


def _sglang_config(head: Eagle3DraftHead, ids: list[int] | None) -> dict:
    # no draft_type marker: hub.load_eagle3 then reads the ids by SGLang's rule, as SGLang does
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], **_llama_fields(head), "bias": head.fc_bias,
           "draft_vocab_size": head.d2t.numel(), "target_hidden_size": head.target_hidden}
    if ids is not None:
        cfg["eagle_aux_hidden_state_layer_ids"] = ids
    return cfg


def _speculators_config(head: Eagle3DraftHead, tokens: int, verifier: str, architectures: list[str]) -> dict:
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "transformer_layer_config": _llama_fields(head), "draft_vocab_size": head.d2t.numel(),
            "norm_before_residual": False, "target_hidden_size": head.target_hidden,
            "eagle_aux_hidden_state_layer_ids": [int(i) for i in head.feature_layers],
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens,
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": verifier, "architectures": architectures}}}
