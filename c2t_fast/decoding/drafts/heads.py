"""Draft heads over the target's features: ``FeatureHead``, what the EAGLE heads share (the target's
token embedding, the fed tree's features, the step protocol), and ``EagleDraftHead``, the EAGLE-1/2 head
this package trains (``training.draft_head``) and the published EAGLE-1/2 heads load into
(``drafts.hub``). The EAGLE-3 head is its sibling in ``drafts.eagle3``."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ...hf import adapter as hf
from ...hf import layers as hf_layers
from ...kernels.skinny_linear import few_row_linear, is_routed
from .base import Draft, read_config


class FeatureHead(Draft):
    """A draft head reading the target's features: a token and the feature before it in, a predicted
    feature out (``features_forward``), logits from it (``_logits``). Prefill, root and tree layers are
    fed here; the head's own output at a node is its children's feature (the chain a draft grows)."""

    own_embedding = False  # True: the head has its own token embedding (some published EAGLE heads)

    def features_forward(self, tokens: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor,
                         mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        """tokens [1, n], features [1, n, F] -> the head's outputs [1, n, H]."""
        raise NotImplementedError

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _attach_embedding(self, target) -> None:
        if not self.own_embedding:
            self.embed_tokens = hf.replicated(hf.token_embedding(target))

    def _shares_embedding(self, target) -> bool:
        return self.own_embedding or self.embed_tokens is hf.replicated(hf.token_embedding(target))

    def _feed(self, tokens, features, visible):
        n = tokens.shape[-1]
        mask, pos = self._slots(n, visible, features.dtype, features.device)
        return self.features_forward(tokens.view(1, n), features.view(1, n, -1), pos[None], mask, self.cache)[0]

    def prefill(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """ids [P], hidden [P, H] (target post-norm features): pairs (x_{t+1}, h_t)."""
        self.cache = None
        self.n_tree = 0
        self._outputs = None
        if ids.numel() > 1:
            self._feed(ids[1:], hidden[:-1], None)
        self.n_stable = ids.numel() - 1

    def root(self, token: int, feature: torch.Tensor) -> torch.Tensor:
        tok = torch.tensor([token], device=feature.device)
        vis = torch.ones(1, 1, dtype=torch.bool)
        out = self._feed(tok, feature.view(1, -1), vis)
        self._outputs = [out[0]]
        self.n_tree = 1
        return self._logits(out)[0]

    def layer_logits(self, tokens: torch.Tensor, parent_slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([self._outputs[int(p)] for p in parent_slots])
        out = self._feed(tokens, feats, visible)
        self._outputs.extend(out.unbind(0))
        self.n_tree += tokens.numel()
        return self._logits(out)


class EagleDraftHead(FeatureHead):
    """EAGLE-1/2 draft head: one decoder layer over fc([token embedding; feature]), sharing the target's
    embedding and LM head (not stored). Trained to predict the target's next (post-norm) hidden state;
    ``lm_head(prediction)`` gives the draft's next-token logits, over the whole vocabulary or, after
    ``restrict_vocab(ids)``, over the rows ``ids`` of the LM head only (FR-Spec style: on a small target
    the 49k-row LM head is most of a draft step's cost)."""

    def __init__(self, config, embed_tokens: nn.Embedding | None = None, lm_head: nn.Linear | None = None,
                 input_norm: bool = True, fc_bias: bool = True):
        super().__init__()
        cfg = self.head_config(config)
        self.config = cfg
        H = cfg.hidden_size
        # input_norm=False, fc_bias from the config: the published EAGLE-1/2 heads (drafts.hub)
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
        if attached and (not self._shares_embedding(target) or self.lm_head is not hf.replicated(hf.lm_head(target))):
            raise ValueError("the draft head is not attached to this target (embed_tokens / lm_head are another "
                             "model's or missing); call head.attach(target)")

    def attach(self, target) -> "EagleDraftHead":
        """Share the target's (frozen) embedding and LM head."""
        self._attach_embedding(target)
        self.lm_head = hf.replicated(hf.lm_head(target))  # a sharded target's: a full copy per rank
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
        # the restricted head follows the routing of the head's own layers (kernels.skinny_linear)
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
