"""Training of an EAGLE-3-style draft head (arXiv:2503.01840) on the target's own outputs, on the CPU,
resumable.

The head (``decoding.drafts.hub.Eagle3DraftHead``, saved in the published EAGLE-3 layout with
``draft_type: "eagle3"``): ``fc`` fuses the residual streams entering three target layers (low, middle,
high: 2, N/2, N-3), one decoder layer reads [normed token embedding; normed fused feature], its own final
norm and LM head over a draft vocabulary (the most frequent ids of the training replies) mapped to target
ids by ``d2t``.

Training-time test: the head is unrolled for ``steps`` steps over a whole sequence at once. Step 0 reads
(token t+1, the target's fused feature at t) at every position t; step i reads (token t+1+i, the head's
own step i-1 output at t), attends to step 0's keys at positions <= t and to its own earlier steps at t
(the chain a draft grows at inference), at RoPE position t+i (the node's position in a tree). Step i is
scored against the target's distribution at t+1+i over the draft vocabulary (renormalised over it, as
EAGLE-3 does; positions whose target argmax lies outside the draft vocabulary are left out), weighted
0.8^i. No feature regression (EAGLE-3 drops it). Steps >= 1 run only at the trained positions (the
reply): the prompt is context for step 0 only.

Decided for a CPU budget: ``steps`` 3 (EAGLE-3 unrolls 7), one sequence per forward with gradient
accumulation, the teacher computed on the fly from the cached post-norm last hidden state through the
target's LM head rows of the draft vocabulary (the cache holds no logits).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from ..decoding.drafts import Eagle3DraftHead, eagle3_feature_layers
from ..hf import adapter as hf
from ..hf import layers as hf_layers
from .draft_head import finish_training, load_cached, split_validation, train_loop
from .head_config import HeadTrainConfig
from .unrolled import chain_acceptance, chain_targets, unrolled_logits


@dataclass
class Eagle3TrainConfig(HeadTrainConfig):
    steps: int = 3  # training-time test unroll
    step_decay: float = 0.8  # weight of step i: decay ** i
    draft_vocab: int = 8192  # ids in the head's vocabulary (the most frequent of the trained tokens)
    val_fraction: float = 0.05  # cached sequences held out
    eval_every: int = 0  # optimizer steps between held-out chain acceptance figures (0: at the end only)
    probe_init: bool = True  # fc starts as a least-squares probe of the target's last hidden state

    def validate(self) -> None:
        super().validate()
        if self.eval_every < 0:
            raise ValueError(f"Eagle3TrainConfig.eval_every must be >= 0, got {self.eval_every}")
        for name in ("steps", "draft_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"Eagle3TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.step_decay <= 1 or not 0 <= self.val_fraction < 1:
            raise ValueError("Eagle3TrainConfig: step_decay in (0, 1], val_fraction in [0, 1)")


def new_eagle3_head(target, vocab_ids: torch.Tensor, feature_layers: tuple | None = None,
                    extra_layers: int = 0) -> Eagle3DraftHead:
    """An untrained head for ``target`` drafting over ``vocab_ids`` (sorted int64), attached to it. Its
    LM head starts as the target's rows of those ids and its final norm as the target's (so the fresh
    head maps a target-like hidden state to target-like logits); fc starts as the projection onto the
    highest of the three features (closest to the last hidden state)."""
    tc = hf.text_config(target)
    cfg = hf_layers.head_config(tc)
    layers = tuple(feature_layers) if feature_layers is not None else eagle3_feature_layers(tc.num_hidden_layers)
    head = Eagle3DraftHead(cfg, tc.hidden_size, vocab_ids.numel(), layers, extra_layers=extra_layers)
    head.set_d2t(vocab_ids - torch.arange(vocab_ids.numel()))
    H = tc.hidden_size
    with torch.no_grad():
        head.lm_head.weight.copy_(hf.lm_head(target).weight.detach()[vocab_ids])
        norm = hf.final_norm(target)
        if norm is not None and getattr(norm, "weight", None) is not None:
            head.norm.weight.copy_(norm.weight.detach())
        head.fc.weight.zero_()
        head.fc.weight[:, 2 * H:].copy_(torch.eye(H))
    return head.attach(target)


def ttt_losses(head: Eagle3DraftHead, seq: dict, lm_rows: torch.Tensor, steps: int, decay: float):
    """(weighted loss, per-step soft CE list, per-step top-1 agreement list, per-step counts) of one
    cached sequence (``cache_hidden_states`` with ``feature_layers``). ``lm_rows``: the target's LM head
    rows of the draft vocabulary ``[V_d, H]`` (the teacher)."""
    ids, lf = seq["ids"].long(), seq.get("loss_from", 0)
    logits = unrolled_logits(head, ids, seq["aux"].float(), steps, lf)
    top, valid = chain_targets(seq, steps, lf)
    in_vocab = head.t2d_mask()[top]
    hidden = seq["hidden"].float()
    m = ids.numel() - 1
    total, ces, accs, counts = 0.0, [], [], []
    vocab_ids = head.vocab_ids_or_all()
    for i, lg in enumerate(logits):
        pos = torch.arange(lf, m) + 1 + i
        keep = valid[i] & in_vocab[i]
        with torch.no_grad():
            p = torch.softmax(hidden[pos.clamp(max=m)] @ lm_rows.T, -1)
        ce_rows = -(p * torch.log_softmax(lg, -1)).sum(-1)
        n = int(keep.sum())
        ce = (ce_rows * keep).sum() / max(n, 1)
        total = total + decay ** i * ce
        with torch.no_grad():
            agree = ((vocab_ids[lg.max(-1).indices] == top[i]) & valid[i]).sum().item()
        ces.append(ce.item())
        accs.append(agree / max(int(valid[i].sum()), 1))
        counts.append(int(valid[i].sum()))
    return total, ces, accs, counts


def load_eagle3_cache(cache_dir: str) -> list[dict]:
    """The cached sequences, refused when they lack the fused features."""
    data = load_cached(cache_dir)
    if "aux" not in data[0]:
        raise ValueError(f"{cache_dir} was cached without feature_layers (an EAGLE-1 cache); an EAGLE-3 head needs "
                         "the fused features")
    return data


def feature_scale(data: list[dict], max_positions: int = 200_000) -> torch.Tensor:
    """Per-dimension RMS of the fused features (float32 ``[3 Ht]``, floored away from zero)."""
    X = torch.cat([s["aux"].float() for s in data])[:max_positions]
    rms = X.pow(2).mean(0).sqrt()
    return rms.clamp(min=1e-3 * float(rms.mean()) + 1e-12)


def standardised(data: list[dict], scale: torch.Tensor) -> list[dict]:
    """Copies of the cached sequences with ``aux / scale`` (float32)."""
    return [{**s, "aux": s["aux"].float() / scale} for s in data]


@torch.no_grad()
def probe_init(head: Eagle3DraftHead, data: list[dict], max_positions: int = 200_000, ridge: float = 1e-3) -> float:
    """Start the head as a linear probe: ``fc`` fits (least squares, ridge-regularised) the target's
    normalised last hidden state one position ahead (what step 0 at pair t is scored against), divided
    by the final norm's weight, from the three fused features at t; the decoder layer's output
    projections start at zero, so the fresh head's output is ``fc(features)`` and its norm + LM head
    give the probe's guess of the target's next distribution. Returns the probe's relative residual.
    (A fresh head's logit lens of layer N-3 alone scored a soft CE of ~14 on SmolLM2; trained from there
    a CPU budget is spent relearning what a probe gives at once.)"""
    g = head.norm.weight.detach().float()
    X = torch.cat([s["aux"][:-1].float() for s in data])[:max_positions]  # pair t reads the feature of t
    Y = torch.cat([s["hidden"][1:].float() for s in data])[:max_positions] / g  # and is scored against t + 1
    xtx = X.T @ X
    xtx += ridge * xtx.diagonal().mean() * torch.eye(X.shape[1])
    W = torch.linalg.solve(xtx, X.T @ Y).T  # [H, 3H]
    head.fc.weight.copy_(W.to(head.fc.weight.dtype))
    if head.fc.bias is not None:
        head.fc.bias.zero_()
    for attn, mlp in [(head.midlayer.self_attn, head.midlayer.mlp)] + [(x.layer.self_attn, x.layer.mlp)
                                                                       for x in head.extra_layers]:
        attn.o_proj.weight.zero_()
        mlp.down_proj.weight.zero_()
    return float((X @ W.T - Y).norm() / Y.norm())


def draft_vocabulary(data: list[dict], n: int) -> tuple[torch.Tensor, float]:
    """(the ``n`` most frequent target tokens at the trained positions, sorted; the share of those
    positions they cover)."""
    tops = torch.cat([s["top"][s.get("loss_from", 0) + 1:].long() for s in data])
    counts = torch.bincount(tops)
    ids = counts.argsort(descending=True)[:n].sort().values
    return ids, float(counts[ids].sum() / max(tops.numel(), 1))


def train_eagle3(target, cache_dir: str, out_dir: str, config: Eagle3TrainConfig | None = None,
                 progress: bool = True) -> dict:
    """Train (or resume training) an EAGLE-3-style head on features cached with ``feature_layers``;
    writes the head (published EAGLE-3 layout), ``report.json`` and ``training.png``; returns the report."""
    cfg = config or Eagle3TrainConfig()
    cfg.validate()
    torch.manual_seed(cfg.seed)
    data, val = split_validation(load_eagle3_cache(cache_dir), cfg.val_fraction)
    with open(os.path.join(cache_dir, "meta.json")) as f:
        layers = tuple(json.load(f)["feature_layers"])
    vocab_ids, coverage = draft_vocabulary(data, cfg.draft_vocab)
    head = new_eagle3_head(target, vocab_ids, layers)
    # Train fc on per-dimension standardised features (folded back into fc at the end: the saved head
    # reads the raw features). The residual streams have a few huge dimensions, and Adam moves every
    # weight by about the learning rate: on raw features one step at 5e-5 took SmolLM2's probe-initialised
    # head from a soft CE of 3.6 to 8.7.
    scale = feature_scale(data)
    data, val = standardised(data, scale), standardised(val, scale)
    if cfg.probe_init:
        probe_init(head, data)
    lm_rows = hf.lm_head(target).weight.detach()[vocab_ids].float()
    params = [p for n, p in head.named_parameters() if p.requires_grad and not n.startswith("embed_tokens")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def step_loss(seq):
        loss, ces, accs, _ = ttt_losses(head, seq, lm_rows, cfg.steps, cfg.step_decay)
        return loss, {"loss": loss.item(), "ce": ces, "top1": accs,
                      "positions": seq["ids"].numel() - 1 - seq.get("loss_from", 0)}

    def evaluate(state):  # the held-out acceptance against the trained positions seen so far
        if cfg.eval_every and val and state["step"] % cfg.eval_every == 0:
            seen = sum(h["positions"] * h["sequences"] for h in state["history"])
            state.setdefault("evals", []).append({**chain_acceptance(head, val, cfg.steps), "step": state["step"],
                                                  "trained_positions": int(round(seen))})

    state = train_loop(head, opt, params, data, cfg, out_dir, step_loss, "training EAGLE-3 head", progress,
                       frozen=("embed_tokens",), on_step=evaluate)
    validation = chain_acceptance(head, val, cfg.steps) if val else None
    with torch.no_grad():
        head.fc.weight.div_(scale.to(head.fc.weight))  # fc(x / s) = (W / s) x: the head reads raw features
    head.save_pretrained(out_dir)
    report = {"config": asdict(cfg), "feature_layers": list(layers), "sequences": len(data),
              "tokens": int(sum(s["ids"].numel() for s in data)),
              "trained_positions": int(sum(s["ids"].numel() - 1 - s.get("loss_from", 0) for s in data)),
              "draft_vocab_coverage": coverage, "steps": state["step"],
              "validation": validation, "evals": state.get("evals", []), "history": state["history"]}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_history(state["history"], os.path.join(out_dir, "training.png"), state.get("evals", []))
    finish_training(out_dir)
    return report



def plot_history(history: list[dict], path: str, evals: list[dict] = ()) -> None:
    """Soft CE and top-1 agreement of every unrolled step over the optimizer steps, and the held-out
    chain acceptance against the trained positions seen (when evaluated during training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(16 if evals else 11, 3.8))
    k = max(1, len(steps) // 50)  # a running mean: per-step values of a few sequences are noisy
    for key, ax, title in (("ce", axes[0], "soft CE vs target (draft vocab)"), ("top1", axes[1], "top-1 agreement")):
        for i in range(len(history[0][key])):
            vals = [h[key][i] for h in history]
            smooth = [sum(vals[max(0, j - k + 1):j + 1]) / len(vals[max(0, j - k + 1):j + 1]) for j in range(len(vals))]
            ax.plot(steps, smooth, label=f"unrolled step {i}")
        ax.set(xlabel="optimizer step", title=title)
        ax.legend()
    if evals:
        for i in range(len(evals[0]["conditional"])):
            axes[2].plot([e["trained_positions"] for e in evals], [float("nan") if e["conditional"][i] is None else e["conditional"][i] for e in evals], marker="o",
                         label=f"drafted token {i + 1} (given the earlier ones)")
        axes[2].set(xlabel="trained positions seen", ylabel="held-out acceptance", title="acceptance vs training tokens")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
