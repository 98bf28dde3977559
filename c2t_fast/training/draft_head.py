"""Training of the EAGLE-style draft head (EAGLE-1 losses), on the CPU within hours, resumable.

1. ``cache_hidden_states``: run the frozen target over chat-formatted training text and store its
   post-norm last hidden states in fp16 shards (resumable; a token budget bounds the cost).
2. ``train_draft``: for each cached sequence the head reads pairs (token_{t+1}, feature_t) and predicts
   feature_{t+1}; loss = SmoothL1(prediction, feature_{t+1}) + w_cls * CE(lm_head(prediction),
   softmax(lm_head(feature_{t+1}))) through the frozen LM head, as in EAGLE-1. Checkpoints every N
   steps and resumes from the last one; writes the head (safetensors), ``report.json`` and a loss plot.
Choices made for a CPU budget (EAGLE trains from scratch on a GPU for far longer):
- ``fc`` starts as the projection onto the feature half, so the untrained head maps h_t to a sensible
  hidden state (SmolLM2, held-out token CE at init: 10.9 with it, 13.8 with a random fc). Starting the
  decoder layer from the target's last layer is available but off: that layer expects the pre-norm
  residual stream, not post-norm features, and at init it measured far worse (CE 164).
- The classification loss runs over the ``loss_vocab`` most frequent token ids of the cached text
  (target and prediction both renormalised over them): the 49k-way LM head otherwise costs ~7x the
  decoder layer per token. The same ids are saved with the head as its draft vocabulary (FR-Spec style:
  at inference the head scores only those rows of the LM head; ``draft_vocab=False`` keeps the whole
  vocabulary). Validation reports top-1 agreement over the full vocabulary and over the draft vocabulary.
- The learning rate warms up linearly, then decays on a cosine; a held-out slice of the cached sequences
  gives the validation top-1 agreement reported at the end.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..decoding.drafts import EagleDraftHead
from ..hf.adapter import TargetAdapter, decoder_of, encode_chat, text_config
from .head_config import HeadTrainConfig


def encode_conversations(tokenizer, conversations: Iterable[list[dict]], max_len: int) -> Iterator[torch.Tensor]:
    """Chat-template token ids of each conversation, truncated to ``max_len``."""
    for msgs in conversations:
        ids = encode_chat(tokenizer, msgs, add_generation_prompt=False)
        if ids.numel() >= 8:
            yield ids[:max_len]


def cache_hidden_states(target, sequences: Iterable, cache_dir: str, token_budget: int, shard_size: int = 32,
                        progress: bool = True, feature_layers: tuple | None = None) -> dict:
    """Append shards of the frozen target's features to ``cache_dir`` until ``token_budget`` tokens are
    cached; rerunning skips the sequences already cached (the settings must match the cache's).

    ``sequences``: int64 ``[n]`` token ids, or ``(ids, loss_from[, extra dict])``: the head is trained only
    at pair positions ``t >= loss_from`` (pair t = token t+1 with the feature of t, predicting token t+2;
    a reply starting at index p gives ``loss_from = p - 1``), the earlier ones are context; ``extra``'s
    items are stored with the sequence (``sampled``). Each cached
    sequence: ``ids`` int32, ``hidden`` fp16 post-norm last hidden states ``[n, H]``, ``loss_from``; with
    ``feature_layers`` (EAGLE-3) also ``aux`` fp16 ``[n, len * H]`` (the residual streams entering those
    layers) and ``top`` int32 ``[n]`` (the target's argmax over its whole vocabulary)."""
    os.makedirs(cache_dir, exist_ok=True)
    meta_file = os.path.join(cache_dir, "meta.json")
    layers = None if feature_layers is None else [int(i) for i in feature_layers]
    meta = {"sequences": 0, "consumed": 0, "tokens": 0, "shards": 0, "feature_layers": layers}
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("feature_layers") != layers:
            raise ValueError(f"{cache_dir} caches feature_layers {meta.get('feature_layers')}, not {layers}; "
                             "use another cache directory")
    adapter = TargetAdapter(target)
    shard: list[dict] = []

    def flush():
        if shard:
            torch.save(shard, os.path.join(cache_dir, f"shard_{meta['shards']:05d}.pt"))
            meta["shards"] += 1
            shard.clear()
        tmp = meta_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, meta_file)

    bar = tqdm(total=token_budget, initial=min(meta["tokens"], token_budget), desc="caching target features",
               disable=not progress)
    dev = adapter.device
    with torch.no_grad():
        for i, item in enumerate(sequences):
            if meta["tokens"] >= token_budget:
                break
            if i < meta.get("consumed", meta["sequences"]):
                continue  # cached (or skipped) by an earlier run
            meta["consumed"] = i + 1
            ids, loss_from, extra = (*item, {})[:3] if isinstance(item, tuple) else (item, 0, {})
            if ids.numel() - 2 <= loss_from:
                continue  # no position to train (a reply cut away by max_len)
            if layers is None:
                row = {"hidden": adapter.hidden_states(ids.to(dev)).to(torch.float16).cpu()}
            else:
                h, aux = adapter.hidden_and_features(ids.to(dev), tuple(layers))
                row = {"hidden": h.to(torch.float16).cpu(), "aux": aux.to(torch.float16).cpu(),
                       "top": adapter.lm_head(h).argmax(-1).to(torch.int32).cpu()}
            shard.append({"ids": ids.to(torch.int32), "loss_from": int(loss_from), **extra, **row})
            meta["sequences"] += 1
            meta["tokens"] += ids.numel()
            bar.update(ids.numel())
            if len(shard) >= shard_size:
                flush()
    flush()
    bar.close()
    return meta


@dataclass
class DraftTrainConfig(HeadTrainConfig):
    weight_cls: float = 0.1
    init_from_target: bool = False  # decoder layer from the target's last layer
    fc_identity: bool = True  # fc starts as the projection onto the feature half
    val_fraction: float = 0.05  # cached sequences held out for the validation top-1
    loss_vocab: int = 8192  # token ids in the training CE (0: the full vocabulary)
    draft_vocab: bool = True  # the head drafts over those ids only at inference (saved with it)
    init_from: str | None = None  # a saved EAGLE-1 head to fine-tune (its fc, layer and norms; fc_identity ignored)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps (at most a tenth of the run: a short run that never left its
    warm-up trained at a fraction of its rate), then cosine from 1 to 0.1 at ``total``."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))


def load_cached(cache_dir: str) -> list[dict]:
    """Every sequence cached in ``cache_dir`` (``cache_hidden_states``), in order."""
    files = sorted(glob.glob(os.path.join(cache_dir, "shard_*.pt")))
    if not files:
        raise FileNotFoundError(f"no cached features in {cache_dir} (run cache_hidden_states / c2t-fast train-draft)")
    return [seq for f in files for seq in torch.load(f)]


def split_validation(data: list, fraction: float) -> tuple[list, list]:
    """(train, held-out): the last ``fraction`` of the sequences (at least one when there are >= 4)."""
    n_val = int(len(data) * fraction)
    if n_val == 0 and fraction > 0 and len(data) >= 4:
        n_val = 1
    return data[:len(data) - n_val], data[len(data) - n_val:]


def frequent_ids(data: list[dict], n: int) -> torch.Tensor:
    """The ``n`` most frequent token ids of the cached sequences' trained part (sorted)."""
    counts = torch.bincount(torch.cat([s["ids"][s.get("loss_from", 0):].long() for s in data]))
    return counts.argsort(descending=True)[:n].sort().values


def draft_losses(head: EagleDraftHead, ids: torch.Tensor, feats: torch.Tensor, weight_cls: float,
                 lm_weight: torch.Tensor | None = None, vocab_ids: torch.Tensor | None = None, loss_from: int = 0):
    """EAGLE-1 losses of one sequence: (total, regression, classification, top-1 agreement), over the
    pair positions from ``loss_from`` on (the earlier ones are context).
    ``lm_weight``: rows of the LM head to score over (default: the whole head). ``vocab_ids``: the token
    ids of those rows; given, top-1 agreement is with the target's argmax over the whole vocabulary (what
    drafting over the rows can reach), otherwise over the same rows."""
    pred = head.features_forward(ids[None, 1:], feats[None, :-1], torch.arange(ids.numel() - 1)[None], None)[0]
    pred, target = pred[loss_from:], feats[1 + loss_from:]
    reg = torch.nn.functional.smooth_l1_loss(pred, target)
    lm = head.lm_head if lm_weight is None else (lambda h: h @ lm_weight.T)
    with torch.no_grad():
        p_target = torch.softmax(lm(target), -1)
    logits = lm(pred)
    cls = -(p_target * torch.log_softmax(logits, -1)).sum(-1).mean()
    if vocab_ids is None:
        acc = (logits.argmax(-1) == p_target.argmax(-1)).float().mean()
    else:
        with torch.no_grad():
            acc = (vocab_ids[logits.argmax(-1)] == head.lm_head(target).argmax(-1)).float().mean()
    return reg + weight_cls * cls, reg.detach(), cls.detach(), acc


@torch.no_grad()
def evaluate_draft(head: EagleDraftHead, data: list[dict], vocab_ids: torch.Tensor | None = None) -> dict:
    """Token-weighted top-1 agreement with the target and token CE of the head on ``data``, the head's
    argmax taken over ``vocab_ids`` (a restricted draft vocabulary) or the whole vocabulary; the target's
    token always over the whole vocabulary, so a restriction costs what it costs."""
    was_training = head.training
    head.eval()
    rows = None if vocab_ids is None else head.lm_head.weight[vocab_ids]
    n = top1 = cls = 0.0
    for seq in data:
        lf = seq.get("loss_from", 0)
        _, _, c, a = draft_losses(head, seq["ids"].long(), seq["hidden"].float(), 0.0, rows, vocab_ids, lf)
        k = seq["ids"].numel() - 1 - lf
        n, top1, cls = n + k, top1 + a.item() * k, cls + c.item() * k
    head.train(was_training)
    return {"top1": top1 / max(n, 1), "cls": cls / max(n, 1), "tokens": int(n)}


def train_draft(target, cache_dir: str, out_dir: str, config: DraftTrainConfig | None = None,
                progress: bool = True, step_hook=None) -> dict:
    """Train (or resume training) a head on the features cached in ``cache_dir``; returns the report.

    ``step_hook(head, optimizer, step) -> callable`` is called once before training (``step`` = optimizer
    steps already taken, > 0 when resuming) and its result after every optimizer step: a place for
    weight transitions such as WISCA that must see the optimizer."""
    cfg = config or DraftTrainConfig()
    torch.manual_seed(cfg.seed)
    data = load_cached(cache_dir)
    data, val = split_validation(data, cfg.val_fraction)
    head = EagleDraftHead(text_config(target)).attach(target)
    for p in (*head.embed_tokens.parameters(), *head.lm_head.parameters()):
        p.requires_grad_(False)
    if cfg.init_from_target:
        layers = decoder_of(target).layers
        missing = head.layer.load_state_dict(layers[-1].state_dict(), strict=False)
        if missing.missing_keys:
            raise ValueError(f"cannot warm-start the head from the target's last layer: {missing.missing_keys}")
    if cfg.init_from:
        init_head(head, cfg.init_from)
    elif cfg.fc_identity:
        H = head.config.hidden_size
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.weight[:, H:].copy_(torch.eye(H))
            head.fc.bias.zero_()
    params = [p for n, p in head.named_parameters() if p.requires_grad and not n.startswith(("embed_tokens",
                                                                                              "lm_head"))]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    loss_ids = frequent_ids(data, cfg.loss_vocab) if cfg.loss_vocab else None
    lm_weight = head.lm_head.weight.detach()[loss_ids] if cfg.loss_vocab else None

    def step_loss(seq):
        loss, reg, cls, acc = draft_losses(head, seq["ids"].long(), seq["hidden"].float(), cfg.weight_cls, lm_weight,
                                           loss_from=seq.get("loss_from", 0))
        return loss, {"loss": loss.item(), "reg": reg.item(), "cls": cls.item(), "top1": acc.item()}

    state = train_loop(head, opt, params, data, cfg, out_dir, step_loss, "training draft head", progress,
                       frozen=("embed_tokens", "lm_head"), step_hook=step_hook)
    head.eval()
    if loss_ids is not None and cfg.draft_vocab:
        head.restrict_vocab(loss_ids)
    head.save_pretrained(out_dir)
    report = {"config": asdict(cfg), "sequences": len(data), "tokens": int(sum(s["ids"].numel() for s in data)),
              "steps": state["step"], "validation": evaluate_draft(head, val) if val else None,
              "history": state["history"]}
    if val and head.vocab_ids is not None:
        report["validation_draft_vocab"] = evaluate_draft(head, val, head.vocab_ids)
    if val and "top" in val[0]:  # cached with the target's argmax: the acceptance along a drafted chain
        from .unrolled import chain_acceptance

        report["chain_acceptance"] = chain_acceptance(head, val)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    _plot(state["history"], os.path.join(out_dir, "training.png"))
    finish_training(out_dir)
    return report


_TARGET_OWNED = ("embed_tokens.", "lm_head.", "rotary.")  # an EAGLE-1 head's modules that are the target's


def init_head(head: EagleDraftHead, path: str) -> None:
    """Start ``head`` from the trained weights of the EAGLE-1 head saved at ``path`` (fine-tuning: a head
    trained on ShareGPT text, then on the target's own replies). The shared embedding and LM head stay the
    target's; the saved head's draft vocabulary is not taken over (the new data decides its own)."""
    try:
        saved = EagleDraftHead.from_pretrained(path, full_vocab=True)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"init_from={path!r}: {err}") from None
    if saved.own_embedding or saved.config.hidden_size != head.config.hidden_size:
        raise ValueError(f"init_from={path!r}: not an EAGLE-1 head of this target's width sharing its embedding")
    state = {k: v for k, v in saved.state_dict().items() if not k.startswith(_TARGET_OWNED)}
    missing, unexpected = head.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(_TARGET_OWNED)]
    if bad or unexpected:
        raise ValueError(f"init_from={path!r}: weights do not match the head (missing {bad}, unexpected {unexpected})")


def train_loop(head, opt, params: list, data: list, cfg, out_dir: str, step_loss, desc: str, progress: bool,
               frozen: tuple = (), step_hook=None, on_step=None) -> dict:
    """The resumable loop every head trains with; returns its state (``step``, ``history``, ...).

    ``cfg``: ``epochs``, ``accumulate`` (sequences per AdamW step), ``grad_clip``, ``lr`` with ``warmup``
    and the cosine decay of ``lr_factor``, ``save_every`` (optimizer steps between atomic checkpoints of
    the head without the ``frozen`` prefixes, the optimizer and the state; a rerun resumes from the last
    one), ``seed`` (the sequence order of each epoch). ``step_loss(seq) -> (loss, {name: float or list of
    floats})``: the figures are averaged over each optimizer step's sequences into ``history``.
    ``step_hook(head, opt, step) -> callable``: called once (``step`` > 0 when resuming), its result
    after every optimizer step (WISCA). ``on_step(state)``: after every optimizer step (evaluations).
    Parameters under the ``frozen`` prefixes (often the target's own, shared) get no gradient during the
    run and their ``requires_grad`` is restored after it: a frozen 49k-row embedding that still took
    gradients cost a fifth of each training step (its dense gradient, filled and accumulated per sequence)."""
    frozen_params = [p for n, p in head.named_parameters() if n.startswith(frozen) and p.requires_grad]
    for p in frozen_params:
        p.requires_grad_(False)
    try:
        return _train_loop(head, opt, params, data, cfg, out_dir, step_loss, desc, progress, frozen, step_hook, on_step)
    finally:
        for p in frozen_params:
            p.requires_grad_(True)


def _train_loop(head, opt, params, data, cfg, out_dir, step_loss, desc, progress, frozen, step_hook, on_step):
    total_steps = cfg.epochs * math.ceil(len(data) / cfg.accumulate)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    state = {"epoch": 0, "index": 0, "step": 0, "history": []}
    if os.path.isfile(ckpt):  # resume
        saved = torch.load(ckpt)
        head.load_state_dict(saved["head"], strict=False)
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    head.train()
    after_step = step_hook(head, opt, state["step"]) if step_hook else None
    order_gen = torch.Generator().manual_seed(cfg.seed)
    orders = [torch.randperm(len(data), generator=order_gen).tolist() for _ in range(cfg.epochs)]
    bar = tqdm(total=cfg.epochs * len(data), initial=state["epoch"] * len(data) + state["index"], desc=desc,
               disable=not progress)
    sums, n_in_step = None, 0
    while state["epoch"] < cfg.epochs:
        order = orders[state["epoch"]]
        while state["index"] < len(order):
            loss, figures = step_loss(data[order[state["index"]]])
            (loss / cfg.accumulate).backward()
            sums = figures if sums is None else {k: _add(sums[k], v) for k, v in figures.items()}
            n_in_step += 1
            state["index"] += 1
            bar.update(1)
            if n_in_step == cfg.accumulate or state["index"] == len(order):
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(state["step"], total_steps, cfg.warmup)
                opt.step()
                opt.zero_grad()
                state["step"] += 1
                if after_step:
                    after_step()
                rec = {"step": state["step"], "epoch": state["epoch"], "sequences": n_in_step,
                       **{k: _scale(v, 1 / n_in_step) for k, v in sums.items()}}
                state["history"].append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
                sums, n_in_step = None, 0
                if on_step:
                    on_step(state)
                if state["step"] % cfg.save_every == 0:
                    tmp = ckpt + ".tmp"  # never a half-written checkpoint after an interruption
                    torch.save({"head": {k: v for k, v in head.state_dict().items() if not k.startswith(frozen)},
                                "opt": opt.state_dict(), "state": state}, tmp)
                    os.replace(tmp, ckpt)
        state["epoch"] += 1
        state["index"] = 0
    bar.close()
    head.eval()
    return state


def finish_training(out_dir: str) -> None:
    """Drop the checkpoint of a finished run: the head itself is the artifact."""
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    if os.path.isfile(ckpt):
        os.remove(ckpt)


def _add(a, b):
    return [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b


def _scale(a, f):
    return [x * f for x in a] if isinstance(a, list) else a * f


def _plot(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in zip(axes, ("reg", "cls", "top1"), ("feature SmoothL1", "token CE (vs target)",
                                                              "top-1 agreement with target")):
        ax.plot(steps, [h[key] for h in history])
        ax.set(xlabel="optimizer step", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_draft_on_text(target, tokenizer, out_dir: str, config, *, distilled: tuple = (),
                        conversations: int | None = None, max_len: int = 1024, cache_dir: str | None = None,
                        token_budget: int = 300_000) -> dict:
    """``c2t-fast train-draft``: cache the target's features of its training text (the target's own replies in
    the ``distill-data`` runs ``distilled``, in that order, else ``conversations`` ShareGPT conversations), then
    train a head on the cache: an EAGLE-3 head when ``config`` is an ``Eagle3TrainConfig`` (three-layer
    features), else an EAGLE-1 head (``DraftTrainConfig``; an EAGLE-3 cache serves it too). ``cache_dir``
    (default ``out_dir/feature_cache``) resumes by count. Returns the training report, ``cache`` added (the
    cache's meta)."""
    from itertools import chain

    from ..decoding.drafts import eagle3_feature_layers
    from .eagle3_head import Eagle3TrainConfig, train_eagle3
    from .sharegpt import sharegpt_conversations

    cache = cache_dir or os.path.join(out_dir, "feature_cache")
    if distilled:  # trained on the reply, the prompt is context
        from .distill import distilled_sequences

        # several runs in the order given: a cache resumes by count, so only the last one may still grow
        sequences = chain.from_iterable(distilled_sequences(d, max_len, with_loss_from=True) for d in distilled)
    else:
        sequences = encode_conversations(tokenizer, sharegpt_conversations(limit=conversations), max_len)
    eagle3 = isinstance(config, Eagle3TrainConfig)
    layers = None
    if eagle3:
        layers = eagle3_feature_layers(text_config(target).num_hidden_layers)
    elif os.path.isfile(os.path.join(cache, "meta.json")):  # an EAGLE-3 cache serves an EAGLE-1 head too
        with open(os.path.join(cache, "meta.json")) as f:
            layers = json.load(f).get("feature_layers")
    meta = cache_hidden_states(target, sequences, cache, token_budget, feature_layers=layers)
    report = train_eagle3(target, cache, out_dir, config) if eagle3 else train_draft(target, cache, out_dir, config)
    return {**report, "cache": {**meta, "dir": cache}}
