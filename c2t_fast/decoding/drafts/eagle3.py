"""The EAGLE-3 draft head (arXiv:2503.01840), sibling of ``EagleDraftHead``: three target layers' features
fused by ``fc``, a midlayer over [normed embedding; normed feature], its own norm and LM head over a draft
vocabulary mapped to target ids by ``d2t``. Saved in the published layout (``drafts.hub`` reads it back);
trained by ``training.eagle3_head`` / ``training.selfdistill_train``."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ...hf import adapter as hf
from ...hf import layers as hf_layers
from .heads import FeatureHead


def eagle3_feature_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """The target layers whose input residual streams EAGLE-3 fuses: low, middle, high (2, N/2, N-3)."""
    n = num_hidden_layers
    return (2, n // 2, n - 3)


class Eagle3DraftHead(FeatureHead):
    """EAGLE-3 head: ``fc`` fuses three target layers' features ``[3 Ht] -> [H]``; one ``Eagle3MidLayer``
    over [normed token embedding; normed feature]; its own final norm and LM head over a draft vocabulary
    of ``draft_vocab`` ids, mapped to target ids by ``d2t`` (``vocab_ids = arange + d2t``). A draft step
    after the root feeds the head's own pre-norm output back as the feature (no ``fc``), as EAGLE-3 does;
    the feature's width (3 Ht or H) says which it is, as in SGLang's loader.
    The step protocol is ``FeatureHead``'s; the engine gives it the features of ``feature_layers``."""

    def __init__(self, cfg, target_hidden: int, draft_vocab: int, feature_layers: tuple, fc_bias: bool = False,
                 extra_layers: int = 0):
        super().__init__()
        self.config = cfg
        self.input_norm, self.fc_bias = True, fc_bias
        H = cfg.hidden_size
        if 3 * target_hidden == cfg.hidden_size:  # the feature's width tells target features from the head's own
            raise ValueError(f"an EAGLE-3 head with hidden_size {cfg.hidden_size} = 3 x target_hidden_size is not "
                             "supported")
        self.target_hidden, self.feature_layers = target_hidden, tuple(feature_layers)
        self.fc = nn.Linear(3 * target_hidden, H, bias=fc_bias)
        self.midlayer = hf_layers.Eagle3MidLayer(cfg)
        # further plain decoder layers after the midlayer (a deeper head: the 1-vs-2-layer ablation); the
        # published layout has none, and config.num_hidden_layers counts them all
        self.extra_layers = nn.ModuleList([hf_layers.StackedLayer(cfg, i + 1) for i in range(extra_layers)])
        self.norm = hf_layers.rms_norm(H, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, draft_vocab, bias=False)
        self.rotary = hf_layers.rotary_embedding(cfg)
        self.embed_tokens = None
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.int64))
        self.vocab_ids = None

    def set_d2t(self, d2t: torch.Tensor) -> "Eagle3DraftHead":
        """Draft id i is target id ``i + d2t[i]``; the identity map over the whole vocabulary is no map."""
        self.d2t.copy_(d2t.to(torch.int64))
        ids = torch.arange(d2t.numel()) + self.d2t.cpu()
        V = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != ids.numel():
            raise ValueError(f"d2t maps draft ids outside [0, {V}) or onto one target id twice")
        full = ids.numel() == V and bool((ids == torch.arange(V)).all())
        self.vocab_ids = None if full else ids
        return self

    def check_target(self, target, attached: bool = True) -> None:
        tc = hf.text_config(target)
        if attached:
            self._check_device(target)
        if self.target_hidden != tc.hidden_size:
            raise ValueError(f"the draft head's target_hidden_size is {self.target_hidden}, this target's hidden_size "
                             f"is {tc.hidden_size}")
        if self.config.vocab_size != hf.vocab_size(target):
            raise ValueError(f"the draft head's vocab_size is {self.config.vocab_size}, this target's is "
                             f"{hf.vocab_size(target)}")
        n = tc.num_hidden_layers
        if any(not 0 <= i < n for i in self.feature_layers):
            raise ValueError(f"the draft head reads target layers {list(self.feature_layers)} "
                             f"(eagle_aux_hidden_state_layer_ids) but the target has {n} layers")
        if attached and not self._shares_embedding(target):
            raise ValueError("the draft head is not attached to this target; call head.attach(target)")

    def attach(self, target) -> "Eagle3DraftHead":
        """Use the target's token embedding unless the head has its own (its LM head is always its own)."""
        self._attach_embedding(target)
        return self

    def restrict_vocab(self, ids):
        raise ValueError("an EAGLE-3 head's draft vocabulary is fixed by its d2t map; train a head over the ids")

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(out)).float()

    def features_forward(self, tokens, features, position_ids, mask, cache=None):
        """tokens [1, n]; features [1, n, 3 Ht] from the target (fused by fc) or [1, n, H] from the head."""
        dtype = self.fc.weight.dtype
        embeds = self.embed_tokens(tokens).to(dtype)
        from_target = features.shape[-1] == 3 * self.target_hidden  # else the head's own output [H]
        hidden = self.fc(features.to(dtype)) if from_target else features.to(dtype)
        pos_emb = self.rotary(hidden, position_ids)
        out = self.midlayer(embeds, hidden, mask, pos_emb, cache)
        for layer in self.extra_layers:
            out = layer(out, mask, pos_emb, cache)
        return out

    def t2d_mask(self) -> torch.Tensor:
        """bool ``[V]`` on the head's device: which target ids the head can draft."""
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.d2t.device)
        mask[self.vocab_ids_or_all().to(self.d2t.device)] = True
        return mask

    def t2d_index(self) -> torch.Tensor:
        """int64 ``[V]`` on the head's device: the draft id of each target id, -1 for those it cannot draft."""
        idx = torch.full((self.config.vocab_size,), -1, dtype=torch.int64, device=self.d2t.device)
        ids = self.vocab_ids_or_all()
        idx[ids] = torch.arange(ids.numel(), device=ids.device)
        return idx

    def vocab_ids_or_all(self) -> torch.Tensor:
        """The target id of every draft column (int64 ``[draft_vocab]``, on the head's device)."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """The published EAGLE-3 layout (``midlayer.*``, ``d2t``/``t2d``, a Llama config with
        ``draft_vocab_size``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``) plus
        ``draft_type: "eagle3"``: readable by ``load_eagle3`` here and by EAGLE-3 loaders elsewhere.
        The target's token embedding is not stored unless the head has its own."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        skip = ("rotary.", "d2t") if self.own_embedding else ("rotary.", "d2t", "embed_tokens.")
        state = {k: v.detach().cpu().to(dtype or v.dtype).contiguous() for k, v in self.state_dict().items()
                 if not k.startswith(skip)}
        state["d2t"] = self.d2t.detach().cpu().contiguous()
        state["t2d"] = self.t2d_mask().cpu().contiguous()
        save_file(state, os.path.join(path, "model.safetensors"))
        cfg = self.config.to_dict()
        cfg.update(architectures=["LlamaForCausalLMEagle3"], draft_type="eagle3", bias=self.fc_bias,
                   num_hidden_layers=1 + len(self.extra_layers),
                   draft_vocab_size=self.d2t.numel(), target_hidden_size=self.target_hidden,
                   eagle_aux_hidden_state_layer_ids=list(self.feature_layers))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, default=str)
