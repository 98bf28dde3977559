"""Drafts behind one declared protocol (``DraftProtocol``): an EAGLE-1/2-style draft head over the
target's features (``EagleDraftHead``), and any small causal LM that shares the target's tokenizer
(``DraftLM``).

A draft with a restricted vocabulary (``vocab_ids`` not None, FR-Spec style) returns logits over those
ids only: column j is token ``vocab_ids[j]``. Strategies map columns back to tokens
(``TreeDrafter.token_of``). Verification is unchanged (the acceptance rules never read the draft's
distribution), so a restricted draft is exactly as lossless as a full one; it only cannot propose
tokens outside its vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..hf import adapter as hf
from ..hf import layers as hf_layers
from ..kernels.skinny_linear import few_row_linear, is_routed


def read_config(path: str):
    """The parsed ``config.json`` of a draft directory (FileNotFoundError / ValueError naming the file)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no draft head at {path!r} (no config.json)")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except ValueError as err:
        raise ValueError(f"draft {cfg_file} is not valid JSON ({err})") from None


def _tree_mask(n_stable: int, visible: torch.Tensor, dtype, device) -> torch.Tensor:
    """Additive 4D mask [1, 1, n, n_stable + n_tree]: stable context visible, tree slots as given."""
    n, n_tree = visible.shape
    allowed = torch.cat([torch.ones(n, n_stable, dtype=torch.bool, device=device), visible.to(device)], -1)
    mask = torch.zeros(n, n_stable + n_tree, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@runtime_checkable
class DraftProtocol(Protocol):
    """What the engine and the strategies call on a draft, for one speculative step (batch 1). Positions
    of the draft's KV cache are "slots"; the tree of a step occupies the slots after the stable context.

    All logits are fp32 on the draft's device, which must be the target's (``check_target``)."""

    vocab_ids: torch.Tensor | None  # restricted draft vocabulary (sorted int64 token ids), None: all

    def check_target(self, target) -> None:
        """Raise ValueError naming the field when this draft cannot draft for ``target``."""

    def vocab_ids_on(self, device) -> torch.Tensor | None:
        """``vocab_ids`` on ``device`` (None for a full vocabulary)."""

    def prefill(self, ids: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """ids ``int64 [P]`` (the prompt) and the target's post-norm hidden states ``[P, H]``: the
        prompt becomes the stable context."""

    def root(self, token: int, feature: torch.Tensor | None) -> torch.Tensor:
        """Feeds the root (the token the target just produced, with the target's feature ``[H]`` before
        it) as tree slot 0 -> next-token logits ``[V]``."""

    def layer_logits(self, tokens: torch.Tensor, parent_slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Feeds a layer of n tree nodes (``tokens int64 [n]``, their parents' slots ``[n]``, ``visible
        bool [n, n_tree + n]``: the tree slots each node sees, its ancestors and itself) -> logits
        ``[n, V]``; the nodes take the next n slots."""

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        """Drops the tree except the root, then appends the accepted nodes ``int64 [a]`` as context
        (for a head, each paired with the target feature ``[a, H]`` of its predecessor)."""

    def extend(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        """Appends tokens ``int64 [a]`` the target produced without a tree (plain decoding steps) as
        context, each with the target feature ``[a, H]`` of its predecessor; no tree is pending.
        Needed only by the engine's cost rule (``budget="auto"``)."""


class Draft(nn.Module):
    """Common bookkeeping of our drafts (``DraftProtocol``): stable length, tree slot count, the KV cache."""

    needs_features = False
    vocab_ids: torch.Tensor | None = None  # restricted draft vocabulary (sorted token ids), None: all

    def __init__(self):
        super().__init__()
        self.cache = None
        self.n_stable = 0
        self.n_tree = 0

    def _check_device(self, target) -> None:
        """The tree is grown on the draft's device and verified on the target's: they must be one."""
        dev = hf.device_of(target)
        own = next((p for p in self.parameters() if p is not None), None)
        if own is not None and own.device != dev:
            raise ValueError(f"the draft is on {own.device} but the target on {dev}; move the draft with .to({dev!s})")

    def vocab_ids_on(self, device) -> torch.Tensor | None:
        """``vocab_ids`` on ``device`` (copied once per device and vocabulary, not per step)."""
        if self.vocab_ids is None:
            return None
        cached = getattr(self, "_vocab_ids_cache", None)
        if cached is None or cached[0] is not self.vocab_ids or cached[1].device != torch.device(device):
            cached = (self.vocab_ids, self.vocab_ids.to(device))
            self._vocab_ids_cache = cached
        return cached[1]

    def check_target(self, target) -> None:
        """Raise ValueError naming the field when this draft cannot draft for ``target``."""
        self._check_device(target)
        vocab = hf.vocab_size(target)
        mine = getattr(self, "vocab_size", vocab)
        if mine != vocab:
            raise ValueError(f"the draft's vocab_size {mine} differs from the target's ({vocab}); the draft must "
                             "share the target's tokenizer")

    def _crop(self, length: int) -> None:
        hf.crop_cache(self.cache, length)


class EagleDraftHead(Draft):
    """EAGLE-1/2 draft head: one decoder layer over fc([token embedding; feature]), sharing the target's
    embedding and LM head (not stored). Trained to predict the target's next (post-norm) hidden state;
    ``lm_head(prediction)`` gives the draft's next-token logits, over the whole vocabulary or, after
    ``restrict_vocab(ids)``, over the rows ``ids`` of the LM head only (FR-Spec style: on a small target
    the 49k-row LM head is most of a draft step's cost)."""

    needs_features = True

    own_embedding = False  # True: the head has its own token embedding (some published EAGLE heads)

    def __init__(self, config, embed_tokens: nn.Embedding | None = None, lm_head: nn.Linear | None = None,
                 input_norm: bool = True, fc_bias: bool = True):
        super().__init__()
        cfg = self.head_config(config)
        self.config = cfg
        H = cfg.hidden_size
        # input_norm=False, fc_bias from the config: the published EAGLE-1/2 heads (decoding.hub_heads)
        self.input_norm, self.fc_bias = input_norm, fc_bias
        self.fc = nn.Linear(2 * H, H, bias=fc_bias)
        self.layer, self.rotary, self._cache_kw = hf_layers.decoder_layer(cfg, input_norm=input_norm)
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        # lm_head rows of vocab_ids (refreshed by attach / restrict_vocab); buffers so .to() moves them
        self.register_buffer("_lm_rows", None, persistent=False)
        self.register_buffer("_lm_bias", None, persistent=False)

    @staticmethod
    def head_config(config):
        """A one-layer Llama config with the target's widths, heads and RoPE (whatever its family)."""
        return hf_layers.head_config(config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def check_target(self, target, attached: bool = True) -> None:
        """The head's widths must be the target's; with ``attached`` it must share the target's
        embedding and LM head (``attach(target)``)."""
        tc = hf.text_config(target)
        if attached:
            self._check_device(target)
        for key in ("hidden_size", "vocab_size"):
            if getattr(tc, key) != getattr(self.config, key):
                raise ValueError(f"the draft was built for a target with {key} {getattr(self.config, key)}, this "
                                 f"target has {getattr(tc, key)}")
        shares_embedding = self.own_embedding or self.embed_tokens is hf.token_embedding(target)
        if attached and (not shares_embedding or self.lm_head is not hf.lm_head(target)):
            raise ValueError("the draft head is not attached to this target (embed_tokens / lm_head are another "
                             "model's or missing); call head.attach(target)")

    def attach(self, target) -> "EagleDraftHead":
        """Share the target's (frozen) embedding and LM head."""
        if not self.own_embedding:
            self.embed_tokens = hf.token_embedding(target)
        self.lm_head = hf.lm_head(target)
        return self.restrict_vocab(self.vocab_ids)

    def restrict_vocab(self, ids: torch.Tensor | None) -> "EagleDraftHead":
        """Draft over the token ids ``ids`` only (int64 ``[n]``, sorted, unique, within the vocabulary);
        ``None`` restores the full vocabulary. The LM head rows are copied once (the target's own head
        stays shared and untouched)."""
        if ids is None:
            self.vocab_ids, self._lm_rows, self._lm_bias = None, None, None
            return self
        V = self.config.vocab_size
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0:
            raise ValueError(f"draft vocabulary must be a non-empty 1-D int64 tensor of token ids, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"draft vocabulary ids must lie in [0, {V}), got [{int(ids.min())}, {int(ids.max())}]")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("draft vocabulary ids must be sorted and unique")
        self.vocab_ids = ids.cpu()
        if self.lm_head is not None:
            w, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
            self._lm_rows = w.detach()[ids.to(w.device)].contiguous()
            self._lm_bias = None if bias is None else bias.detach()[ids.to(w.device)].contiguous()
        return self

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.vocab_ids is None:
            return self.lm_head(out).float()
        if self._lm_rows is None:
            raise RuntimeError("the draft head is not attached to a target (call attach(target))")
        # the restricted head follows the routing of the head's own layers (hf.fast_linear)
        lin = few_row_linear if is_routed(self.fc) else nn.functional.linear
        return lin(out, self._lm_rows, self._lm_bias).float()

    def features_forward(self, tokens: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor,
                         mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        """tokens [1, n], features [1, n, H] -> predicted next features [1, n, H]."""
        x = self.fc(torch.cat([self.embed_tokens(tokens).to(features.dtype), features], -1))
        pos_emb = self.rotary(x, position_ids)
        kw = {self._cache_kw: cache} if cache is not None else {}
        out = self.layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb,
                         use_cache=cache is not None, **kw)
        return out[0] if isinstance(out, tuple) else out

    def _run(self, tokens, features, visible):
        n = tokens.shape[-1]
        device = features.device
        if self.cache is None:
            self.cache = hf.new_cache()
        past = self.cache.get_seq_length()
        if visible is None:  # a causal chain appended to the context
            mask = torch.full((n, past + n), torch.finfo(features.dtype).min, dtype=features.dtype, device=device)
            mask = torch.triu(mask, diagonal=past + 1)[None, None]
            pos = torch.arange(past, past + n, device=device)[None]
        else:
            mask = _tree_mask(self.n_stable, visible, features.dtype, device)
            pos = (self.n_stable + visible.sum(-1) - 1).to(device)[None]  # depth in the tree
        return self.features_forward(tokens.view(1, n), features.view(1, n, -1), pos, mask, self.cache)[0]

    def prefill(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """ids [P], hidden [P, H] (target post-norm features): pairs (x_{t+1}, h_t)."""
        self.cache = None
        self.n_tree = 0
        self._outputs = None
        if ids.numel() > 1:
            self._run(ids[1:], hidden[:-1], None)
        self.n_stable = ids.numel() - 1

    def root(self, token: int, feature: torch.Tensor) -> torch.Tensor:
        tok = torch.tensor([token], device=feature.device)
        vis = torch.ones(1, 1, dtype=torch.bool)
        out = self._run(tok, feature.view(1, -1), vis)
        self._outputs = [out[0]]
        self.n_tree = 1
        return self._logits(out)[0]

    def layer_logits(self, tokens: torch.Tensor, parent_slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([self._outputs[int(p)] for p in parent_slots])
        out = self._run(tokens, feats, visible)
        self._outputs.extend(out.unbind(0))
        self.n_tree += tokens.numel()
        return self._logits(out)

    def commit(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """tokens: the accepted nodes a_1..a_tau; features: target features at root, a_1..a_{tau-1}."""
        self._crop(self.n_stable + 1)  # the root's entry used true features: keep it
        self.n_stable += 1
        self.n_tree = 0
        if tokens.numel():
            self._run(tokens, features, None)
            self.n_stable += tokens.numel()

    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """Context the target produced in plain steps: pairs (token, feature of its predecessor)."""
        self._crop(self.n_stable)
        self.n_tree = 0
        if tokens.numel():
            self._run(tokens, features, None)
            self.n_stable += tokens.numel()

    # -- persistence ---------------------------------------------------------------------------------

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Weights (without the target's shared embedding / LM head) as safetensors, optionally cast
        (fp16 halves a shipped head; loading casts back to the module's dtype)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        shared = ("lm_head.", "rotary.") if self.own_embedding else ("embed_tokens.", "lm_head.", "rotary.")
        state = {k: v.detach().cpu().to(dtype or v.dtype).contiguous() for k, v in self.state_dict().items()
                 if not k.startswith(shared)}
        if self.vocab_ids is not None:
            state["vocab_ids"] = self.vocab_ids.contiguous()
        save_file(state, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"draft_type": "eagle_head", "target_config": self.config.to_dict(), "input_norm": self.input_norm,
                       "fc_bias": self.fc_bias}, f, indent=2, default=str)

    @classmethod
    def from_pretrained(cls, path: str, target=None, full_vocab: bool = False) -> "EagleDraftHead":
        """Load a saved head; a head saved with a restricted vocabulary drafts over it unless
        ``full_vocab``."""
        from safetensors.torch import load_file

        cfg_file = os.path.join(path, "config.json")
        raw = read_config(path)
        if not isinstance(raw, dict) or raw.get("draft_type") != "eagle_head":
            raise ValueError(f"{cfg_file} does not describe an eagle_head draft")
        if not isinstance(raw.get("target_config"), dict):
            raise ValueError(f"{cfg_file}: no 'target_config' object (the widths of the target the head was trained for)")
        try:
            head = cls(hf_layers.head_config_from_dict(raw["target_config"]), input_norm=raw.get("input_norm", True),
                       fc_bias=raw.get("fc_bias", True))
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{cfg_file}: 'target_config' is not a usable model config ({err})") from None
        weights = os.path.join(path, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no draft head weights at {weights}")
        try:
            state = load_file(weights)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{weights} is not a readable safetensors file ({err})") from None
        vocab_ids = state.pop("vocab_ids", None)
        if "embed_tokens.weight" in state:  # a published head's own embedding, kept when it was converted
            head.embed_tokens, head.own_embedding = nn.Embedding(*state["embed_tokens.weight"].shape), True
        missing, unexpected = head.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(("embed_tokens.", "lm_head.", "rotary."))]
        if bad or unexpected:
            raise ValueError(f"{path}: weights do not match the head (missing {bad}, unexpected {unexpected})")
        if target is not None:
            try:
                head.check_target(target, attached=False)
            except ValueError as err:
                raise ValueError(f"the draft head at {path}: {err}") from None
        if vocab_ids is not None and not full_vocab:
            head.restrict_vocab(vocab_ids.long())
        if target is not None:
            head.attach(target)
        return head.eval()


class DraftLM(Draft):
    """A small HF causal LM sharing the target's tokenizer; trees are fed with a 4D ancestor mask."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self._runner = hf.CausalLMRunner(model)

    @property
    def vocab_size(self) -> int:
        return self._runner.vocab_size

    def _run(self, tokens, visible):
        n = tokens.numel()
        if self.cache is None:
            self.cache = hf.new_cache()
        past = self.cache.get_seq_length()
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        if visible is None:
            mask = torch.full((n, past + n), torch.finfo(dtype).min, dtype=dtype, device=device)
            mask = torch.triu(mask, diagonal=past + 1)[None, None]
            pos = torch.arange(past, past + n, device=device)
        else:
            mask = _tree_mask(self.n_stable, visible, dtype, device)
            pos = (self.n_stable + visible.sum(-1) - 1).to(device)
        return self._runner.logits(tokens.view(n).to(device), mask, pos, self.cache)

    def prefill(self, ids: torch.Tensor, hidden=None) -> None:
        self.cache = None
        self.n_tree = 0
        self._run(ids, None)
        self.n_stable = ids.numel()

    def root(self, token: int, feature=None) -> torch.Tensor:
        out = self._run(torch.tensor([token]), torch.ones(1, 1, dtype=torch.bool))
        self.n_tree = 1
        return out[0]

    def layer_logits(self, tokens, parent_slots, visible) -> torch.Tensor:
        out = self._run(tokens, visible)
        self.n_tree += tokens.numel()
        return out

    def commit(self, tokens: torch.Tensor, features=None) -> None:
        self._crop(self.n_stable + 1)
        self.n_stable += 1
        self.n_tree = 0
        if tokens.numel():
            self._run(tokens, None)
            self.n_stable += tokens.numel()

    def extend(self, tokens: torch.Tensor, features=None) -> None:
        self._crop(self.n_stable)
        self.n_tree = 0
        if tokens.numel():
            self._run(tokens, None)
            self.n_stable += tokens.numel()
