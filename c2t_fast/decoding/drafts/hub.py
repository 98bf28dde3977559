"""Draft heads published on the Hugging Face hub, read from a local directory (no downloads).

Layouts (the names SGLang's and vLLM's ``llama_eagle*.py`` loaders read; H = the head's hidden size,
Ht = the target's):

- **EAGLE-1/2** (``yuhuili/EAGLE-*``): ``config.json`` of a one-layer ``LlamaForCausalLM`` (``bias``:
  fc bias, true when absent; ``qkv_bias``: q/k/v biases); weights ``fc.weight [H, 2H]`` (+ ``fc.bias``),
  ``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``,
  ``layers.0.post_attention_layernorm.weight`` and no ``input_layernorm`` (the layer's input norm is
  the identity), optional ``embed_tokens.weight [V, H]`` (else the target's); no final norm; the
  target's LM head. Input feature: the target's post-norm last hidden state.
- **EAGLE-3** (``yuhuili/EAGLE3-*``; the ``layers.0.*`` variant of vLLM's speculators format):
  ``fc.weight [H, 3 Ht]`` (+ ``fc.bias`` when ``bias``), ``midlayer.*`` (or ``layers.0.*``) with
  ``input_layernorm``, ``hidden_norm``, ``post_attention_layernorm``, ``self_attn.{q,k,v}_proj.weight
  [., 2H]``, ``o_proj``, ``mlp.*``; ``norm.weight [H]``; ``lm_head.weight [draft_vocab, H]``; ``d2t
  [draft_vocab]`` (target id = i + d2t[i]) and ``t2d [V]`` (bool); config fields ``draft_vocab_size``,
  ``target_hidden_size``. Input feature: the residual stream entering target layers 2, N/2 and N-3
  (``eagle_aux_hidden_state_layer_ids`` in the config overrides them: read as SGLang reads it, layer
  outputs, unless the config is ours (``draft_type``) or the speculators format's). The speculators format
  (``speculators_model_type: "eagle3"``) nests the layer's config in ``transformer_layer_config`` and names
  further decoder layers ``layers.{i}.*``; its norm variants other than the paper's are refused.

Weights are ``model.safetensors`` or ``pytorch_model.bin``; an optional ``model.`` prefix on every key is
accepted. A head whose shapes do not fit the target, or whose files hold unknown or missing tensors, is
refused with an error that names the field or the keys.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ...hf import adapter as hf
from ...hf import layers as hf_layers
from .base import read_config
from .eagle3 import Eagle3DraftHead, eagle3_feature_layers
from .heads import EagleDraftHead

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a head directory (safetensors preferred), keys without a ``model.`` prefix."""
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    state = load_file(file)
                else:
                    state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - safetensors / pickle raise their own types
                raise ValueError(f"{file} is not a readable weights file ({err})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{file} does not hold a flat dict of tensors")
            if state and all(k.startswith("model.") for k in state):
                state = {k[len("model."):]: v for k, v in state.items()}
            return state
    raise FileNotFoundError(f"draft head {path!r}: no weights ({' or '.join(WEIGHT_FILES)})")


def head_format(path: str) -> str | None:
    """"eagle1" / "eagle3" for a published head's directory, None for anything else (a causal LM)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        return None
    return _format_of(read_config(path), read_weights(path).keys())


def _format_of(raw, keys) -> str | None:
    if "fc.weight" not in keys:
        return None
    eagle3 = (any(k.startswith("midlayer.") or ".hidden_norm." in k for k in keys) or "d2t" in keys
              or (isinstance(raw, dict) and "draft_vocab_size" in raw))
    return "eagle3" if eagle3 else "eagle1"


def _check_shapes(state: dict, expected: dict, path: str, to_file=lambda key: key) -> None:
    """Every expected tensor present with its shape and nothing else; errors name the file's keys."""
    unknown = sorted(to_file(k) for k in set(state) - set(expected))
    missing = sorted(to_file(k) for k in set(expected) - set(state))
    if unknown or missing:
        raise ValueError(f"draft head {path!r}: " + "; ".join(
            x for x in (f"unknown tensors {unknown}" if unknown else "",
                        f"missing tensors {missing}" if missing else "") if x))
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"draft head {path!r}: {to_file(key)} has shape {tuple(state[key].shape)}, expected "
                             f"{tuple(shape)} for this target")


def _head_config(raw, path: str):
    if not isinstance(raw, dict):
        raise ValueError(f"draft head {path!r}: config.json is not an object")
    try:
        return hf_layers.head_config_from_dict({k: v for k, v in raw.items() if k != "architectures"})
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"draft head {path!r}: config.json is not a usable Llama config ({err})") from None


def _check_width(cfg, target, path: str, field: str, mine: int, theirs: int) -> None:
    if mine != theirs:
        raise ValueError(f"draft head {path!r}: {field} is {mine} but the target's is {theirs}")


def load_eagle1(path: str, target, state: dict | None = None) -> EagleDraftHead:
    """A published EAGLE-1/2 head, attached to ``target`` (``state``: its weights, if already read)."""
    raw = read_config(path)
    cfg = _head_config(raw, path)
    tc = hf.text_config(target)
    _check_width(cfg, target, path, "hidden_size", cfg.hidden_size, tc.hidden_size)
    _check_width(cfg, target, path, "vocab_size", cfg.vocab_size, hf.vocab_size(target))
    qkv_bias = bool(raw.get("qkv_bias", False))
    cfg.attention_bias = qkv_bias
    head = EagleDraftHead(cfg, input_norm=False, fc_bias=bool(raw.get("bias", True)))
    if qkv_bias:  # EAGLE's o_proj has no bias; transformers' attention_bias gives it one: keep it zero
        nn.init.zeros_(head.layer.self_attn.o_proj.bias)
    state = {("layer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
             for k, v in (state if state is not None else read_weights(path)).items()}
    if "embed_tokens.weight" in state:
        head.embed_tokens, head.own_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size), True
    expected = {k: v.shape for k, v in head.state_dict().items()
                if not k.startswith(("rotary.", "lm_head.", "_lm_")) and k != "layer.self_attn.o_proj.bias"}
    if not head.own_embedding:
        expected = {k: v for k, v in expected.items() if not k.startswith("embed_tokens.")}
    _check_shapes(state, expected, path, lambda k: "layers.0." + k[len("layer."):] if k.startswith("layer.") else k)
    head.load_state_dict(state, strict=False)
    return head.attach(target).eval()


def _aux_layer_ids(raw: dict, n: int, path: str) -> tuple[int, ...]:
    """The target layers whose input streams the head fuses, in this package's convention (transformers'
    ``hidden_states[i]``). Our own heads (``draft_type``) and the speculators format write that convention;
    any other config is read as SGLang reads it: explicit ids are layer outputs, shifted by one when the
    first id is 1 (sgl-project/sglang#25454), and absent ids mean (2, N/2, N-3)."""
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        return eagle3_feature_layers(n)
    if not isinstance(ids, list) or len(ids) != 3 or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"draft head {path!r}: eagle_aux_hidden_state_layer_ids must be three layer ids, got {ids!r}")
    if raw.get("draft_type") != "eagle3" and "speculators_model_type" not in raw and ids[0] == 1:
        return tuple(i + 1 for i in ids)
    return tuple(ids)


def _speculators_layer_config(raw: dict, path: str) -> dict:
    """The speculators format's flat view: its ``transformer_layer_config`` with the head's own fields."""
    if raw.get("speculators_model_type") != "eagle3":
        raise ValueError(f"draft head {path!r}: speculators_model_type {raw.get('speculators_model_type')!r} is not "
                         "an EAGLE-3 speculator")
    for flag in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
        # vLLM reads a missing norm_before_residual as true; the speculators library as false
        if raw.get(flag, flag == "norm_before_residual"):
            raise ValueError(f"draft head {path!r}: {flag} is {'true' if flag in raw else 'absent (vLLM: true)'}; "
                             "only the EAGLE-3 paper's layer (all four false) is supported")
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ValueError(f"draft head {path!r}: transformer_layer_config must be an object")
    return {**layer, **{k: raw[k] for k in ("draft_vocab_size", "target_hidden_size",
                                            "eagle_aux_hidden_state_layer_ids", "speculators_model_type") if k in raw}}


def load_eagle3(path: str, target, state: dict | None = None) -> Eagle3DraftHead:
    """A published EAGLE-3 head (``midlayer.*`` or ``layers.0.*`` layout; SGLang's or the speculators
    format's config), attached to ``target`` (``state``: its weights, if already read)."""
    raw = read_config(path)
    if isinstance(raw, dict) and "speculators_model_type" in raw:
        raw = _speculators_layer_config(raw, path)
    cfg = _head_config(raw, path)
    tc = hf.text_config(target)
    Ht = int(raw.get("target_hidden_size") or cfg.hidden_size)
    _check_width(cfg, target, path, "target_hidden_size", Ht, tc.hidden_size)
    _check_width(cfg, target, path, "vocab_size", cfg.vocab_size, hf.vocab_size(target))
    draft_vocab = int(raw.get("draft_vocab_size") or cfg.vocab_size)
    layers = _aux_layer_ids(raw, tc.num_hidden_layers, path)
    state = dict(state) if state is not None else read_weights(path)
    prefix = "midlayer." if any(k.startswith("midlayer.") for k in state) else "layers.0."

    def ours(k: str) -> str:  # layers.{i >= 1}.*: speculators' further decoder layers
        if k.startswith(prefix):
            return "midlayer." + k[len(prefix):]
        head, _, rest = k.partition(".")
        idx, _, name = rest.partition(".")
        if head == "layers" and idx.isdigit() and int(idx) >= 1 and prefix == "layers.0.":
            return f"extra_layers.{int(idx) - 1}.layer.{name}"
        return k

    def theirs(k: str) -> str:
        if k.startswith("midlayer."):
            return prefix + k[len("midlayer."):]
        if k.startswith("extra_layers."):
            idx, _, name = k[len("extra_layers."):].partition(".")
            return f"layers.{int(idx) + 1}.{name[len('layer.'):]}"
        return k

    state = {ours(k): v for k, v in state.items()}
    t2d = state.pop("t2d", None)
    d2t = state.pop("d2t", None)
    if t2d is not None and t2d.numel() != cfg.vocab_size:
        raise ValueError(f"draft head {path!r}: t2d has {t2d.numel()} entries, expected vocab_size {cfg.vocab_size}")
    head = Eagle3DraftHead(cfg, Ht, draft_vocab, layers, fc_bias="fc.bias" in state,
                           extra_layers=max(0, int(raw.get("num_hidden_layers") or 1) - 1))
    if "embed_tokens.weight" in state:
        head.embed_tokens, head.own_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size), True
    expected = {k: v.shape for k, v in head.state_dict().items() if not k.startswith("rotary.") and k != "d2t"}
    _check_shapes(state, expected, path, theirs)
    head.load_state_dict(state, strict=False)
    if d2t is not None:
        if d2t.numel() != draft_vocab:
            raise ValueError(f"draft head {path!r}: d2t has {d2t.numel()} entries, expected draft_vocab_size "
                             f"{draft_vocab}")
        head.set_d2t(d2t)
    elif draft_vocab != cfg.vocab_size:
        raise ValueError(f"draft head {path!r}: draft_vocab_size {draft_vocab} < vocab_size {cfg.vocab_size} but no d2t")
    head.check_target(target, attached=False)
    return head.attach(target).eval()


def load_hub_head(path: str, target):
    """The published head in ``path`` (EAGLE-1/2 or EAGLE-3 layout), attached to ``target``; None when
    the directory is not one (a causal LM or our own format)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        return None
    state = read_weights(path)  # once: a real head's file is hundreds of MB
    fmt = _format_of(read_config(path), state.keys())
    if fmt is None:
        return None
    return (load_eagle3 if fmt == "eagle3" else load_eagle1)(path, target, state)
