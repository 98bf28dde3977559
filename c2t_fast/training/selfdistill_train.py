"""An EAGLE-3 head trained the way the field trains it, on a self-distilled data set (``training.selfdistill``):
three-layer fused features, training-time test, a draft vocabulary chosen by frequency in the target's
own replies, and a distillation loss against the target's top-k distribution (soft labels; ``loss="hard"``
for its argmax, the ablation). Held-out acceptance of the 1st / 2nd / 3rd drafted token is measured on
the data set's held-out conversations (greedy replies), the same ones for every run, so that runs on
different amounts of data give one scaling curve.

Sequences are read lazily from the feature store (memory-mapped fp16), one job per forward; a shard
whose features this machine lacks is recomputed from the token ids first (``ensure_features``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..decoding.drafts import Eagle3DraftHead, eagle3_feature_layers
from ..hf import adapter as hf
from ..hf.static_batch import StaticBatchLM
from .draft_head import finish_training, train_loop
from .eagle3_head import new_eagle3_head, plot_history, probe_init
from .feature_store import FeatureStore, job_features
from . import precision
from .head_config import HeadTrainConfig
from .selfdistill import default_features_dir
from .unrolled import unrolled_logits


@dataclass
class SelfDistillTrainConfig(HeadTrainConfig):
    epochs: int = 1
    warmup: int = 50
    accumulate: int = 8  # jobs (conversations) per optimizer step
    reply_tokens: int | None = None  # train on the data set's first N training reply tokens (None: all)
    steps: int = 3  # training-time-test unroll
    step_decay: float = 0.8
    draft_vocab: int = 16384
    loss: str = "soft"  # "soft": CE against the target's top-k renormalised over the draft vocabulary; "hard": argmax
    layers: int = 1  # decoder layers of the head
    probe_jobs: int = 48  # training jobs whose hidden states fit fc's linear-probe start
    heldout_jobs: int = 100
    precision: str = "auto"  # the head's matmuls: "bf16" autocast, "fp32", "auto": bf16 where measured faster

    def validate(self) -> None:
        if self.precision not in precision.CHOICES:
            raise ValueError(f"SelfDistillTrainConfig.precision must be one of {precision.CHOICES}, got "
                             f"{self.precision!r}")
        if self.loss not in ("soft", "hard"):
            raise ValueError(f"SelfDistillTrainConfig.loss must be 'soft' or 'hard', got {self.loss!r}")
        if self.layers not in (1, 2):
            raise ValueError(f"SelfDistillTrainConfig.layers must be 1 or 2, got {self.layers}")
        super().validate()
        for name in ("steps", "draft_vocab", "heldout_jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelfDistillTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.reply_tokens is not None and self.reply_tokens < 1:
            raise ValueError("SelfDistillTrainConfig.reply_tokens must be >= 1 or None")
        if not 0 < self.step_decay <= 1:
            raise ValueError("SelfDistillTrainConfig: step_decay in (0, 1]")


class SelfDistillData:
    """A data set's jobs with their features: ``refs(split, reply_tokens)`` lists jobs (cheap dicts),
    ``load(ref)`` reads one: ``ids`` int64 ``[n]``, ``aux`` float32 ``[n, F]``, ``teach`` bool ``[n]`` (the
    next token is the target's own: the positions a draft is trained and measured at), ``top_ids`` int64
    ``[n, k]`` and ``top_logp`` float32 ``[n, k]`` (the target's top-k there), ``top`` int64 ``[n]`` (its
    argmax there)."""

    def __init__(self, data_dir: str, features_dir: str | None = None):
        self.dir = data_dir
        with open(os.path.join(data_dir, "meta.json")) as f:
            self.meta = json.load(f)
        cfg = self.meta["config"]
        self.k = cfg["top_logprobs"]
        self.features_dir = features_dir or default_features_dir(data_dir)
        self._store = None

    def store(self, target) -> FeatureStore:
        if self._store is None:
            tc = hf.text_config(target)
            layers = eagle3_feature_layers(tc.num_hidden_layers)
            self._store = FeatureStore(self.features_dir, {"config": self.meta["config"], "dtype": self.meta["dtype"]},
                                       tc.hidden_size * len(layers),
                                       tc.hidden_size if self.meta["config"].get("store_hidden") else 0, self.k,
                                       hf.vocab_size(target), budget_gb=float("inf"))
            self.feature_layers = layers
        return self._store

    def _shard_rows(self, shard: int) -> list[dict]:
        """The shard's committed jobs in job order."""
        info = self.meta["shards"].get(str(shard), {"jobs": 0})
        with open(os.path.join(self.dir, f"shard_{shard:05d}", "index.jsonl")) as f:
            rows = [json.loads(x) for _, x in zip(range(info["jobs"]), f)]
        return sorted(rows, key=lambda r: r["job"])

    def shards(self) -> list[int]:
        return sorted(int(k) for k, v in self.meta["shards"].items() if v["jobs"])

    def refs(self, split: str, reply_tokens: int | None = None, limit: int | None = None) -> list[dict]:
        """The committed jobs of ``split`` (``sharegpt`` and ``magpie`` answers, none skipped) in job order,
        up to ``reply_tokens`` reply tokens or ``limit`` jobs."""
        out, total = [], 0
        for shard in self.shards():
            for row in self._shard_rows(shard):
                if row.get("skipped") or row["kind"] == "magpie_prompt" or row["split"] != split:
                    continue
                if (reply_tokens is not None and total >= reply_tokens) or (limit is not None and len(out) >= limit):
                    return out
                out.append({**row, "shard": shard})
                total += sum(b - a for a, b, _ in row["replies"])
        return out

    def ensure_features(self, target, refs: list[dict], progress: bool = True) -> None:
        """Recompute (once, into the store) the features of every job in ``refs`` this machine lacks."""
        store = self.store(target)
        missing = [r for r in refs if not store.has(r["shard"], r["job"])]
        if not missing:
            return
        lm = StaticBatchLM(target, 1, self.meta["config"]["capacity"], feature_layers=self.feature_layers)
        for ref in tqdm(missing, desc="recomputing features from the token ids", disable=not progress):
            ids = _tokens(self, ref).numpy()
            fin = _Rows(ids, ref["replies"])
            fin.features, fin.hidden, fin.topk_ids, fin.topk_logp = job_features(lm, ids, ref["replies"], self.k,
                                                                                 bool(store.hidden))
            store.append(ref["shard"], ref["job"], fin)
        store.flush()

    def load(self, ref: dict) -> dict:
        arr = self._store.open(ref["shard"])
        a, n = self._store.covered(ref["shard"])["index"][str(ref["job"])]
        tokens = _tokens(self, ref)
        teach = torch.zeros(n, dtype=torch.bool)
        for s, e, _ in ref["replies"]:
            teach[s - 1:e - 1] = True
        top_ids = torch.from_numpy(np.array(arr["topk_ids"][a:a + n]).astype(np.int64))
        return {"ids": tokens, "aux": torch.from_numpy(np.array(arr["features"][a:a + n])),
                "teach": teach, "top_ids": top_ids, "top_logp": torch.from_numpy(np.array(arr["topk_logp"][a:a + n])).float(),
                "top": top_ids[:, 0], "loss_from": max(0, min(s for s, _, _ in ref["replies"]) - 1),
                "greedy": all(t == 0 for _, _, t in ref["replies"])}


class _Rows:
    """What ``FeatureStore.append`` reads of a job (``generator.Finished``'s feature fields)."""

    def __init__(self, tokens, spans):
        self.tokens, self.spans = tokens, spans
        self.features = self.hidden = self.topk_ids = self.topk_logp = None


def reply_vocabulary(data: SelfDistillData, refs: list[dict], n: int, vocab: int) -> torch.Tensor:
    """The ``n`` most frequent token ids among the target's reply tokens of ``refs`` (sorted int64)."""
    counts = torch.zeros(vocab, dtype=torch.int64)
    for ref in refs:
        seq = _tokens(data, ref)
        for s, e, _ in ref["replies"]:
            counts += torch.bincount(seq[s:e], minlength=vocab)
    return counts.argsort(descending=True)[:n].sort().values


def _tokens(data: SelfDistillData, ref: dict) -> torch.Tensor:
    t = np.fromfile(os.path.join(data.dir, f"shard_{ref['shard']:05d}", "tokens.bin"), dtype=data.meta["dtype"],
                    count=ref["length"], offset=ref["offset"] * np.dtype(data.meta["dtype"]).itemsize)
    return torch.from_numpy(t.astype(np.int64))


def coverage(data: SelfDistillData, refs: list[dict], vocab_ids: torch.Tensor, vocab: int) -> float:
    """The share of the reply tokens of ``refs`` inside the draft vocabulary."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[vocab_ids] = True
    inside = total = 0
    for ref in refs:
        seq = _tokens(data, ref)
        for s, e, _ in ref["replies"]:
            inside += int(mask[seq[s:e]].sum())
            total += e - s
    return inside / max(total, 1)


def ttt_losses(head, seq: dict, scale: torch.Tensor, cfg: SelfDistillTrainConfig):
    """(weighted loss, per-step CE, per-step top-1 agreement with the target's argmax, per-step counts) of
    one job: pair t (token t+1, feature t) at unrolled step i predicts token t+2+i; trained where position
    t+1+i is a teacher position whose target distribution reaches the draft vocabulary."""
    ids, lf = seq["ids"], seq["loss_from"]
    logits = unrolled_logits(head, ids, seq["aux"].float() / scale, cfg.steps, lf)
    n = ids.numel()
    t2d = head.t2d_index()
    total, ces, accs, counts = 0.0, [], [], []
    vocab_ids = head.vocab_ids_or_all()
    for i, lg in enumerate(logits):
        pos = torch.arange(lf, n - 1) + 1 + i  # the teacher position of each row
        inside = pos <= n - 1
        pos = pos.clamp(max=n - 1)
        teach = seq["teach"][pos] & inside
        top_d = t2d[seq["top_ids"][pos]]  # [r, k] draft ids, -1 outside the vocabulary
        logq = torch.log_softmax(lg, -1)
        if cfg.loss == "soft":
            w = torch.where(top_d >= 0, seq["top_logp"][pos].exp(), torch.zeros(()))
            mass = w.sum(-1, keepdim=True)
            valid = teach & (mass[:, 0] > 0)
            p = w / mass.clamp(min=1e-12)
            ce_rows = -(p * logq.gather(-1, top_d.clamp(min=0))).sum(-1)
        else:
            valid = teach & (top_d[:, 0] >= 0)
            ce_rows = -logq.gather(-1, top_d[:, :1].clamp(min=0))[:, 0]
        cnt = int(valid.sum())
        ce = (ce_rows * valid).sum() / max(cnt, 1)
        total = total + cfg.step_decay ** i * ce
        with torch.no_grad():
            agree = ((vocab_ids[lg.max(-1).indices] == seq["top_ids"][pos, 0]) & teach).sum().item()
        ces.append(ce.item())
        accs.append(agree / max(int(teach.sum()), 1))
        counts.append(cnt)
    return total, ces, accs, counts


@torch.no_grad()
def heldout_acceptance(head, seqs: list[dict], scale: torch.Tensor | None = None, steps: int = 3) -> dict:
    """Greedy acceptance along a drafted chain on held-out greedy replies: ``chain[i]``, the share of
    positions whose first i+1 drafted tokens all equal the target's argmax; ``conditional[i]`` the
    (i+1)-th given the first i. Counted at positions whose next ``steps`` tokens are teacher positions and
    whose data tokens follow the target's argmax (the chain a greedy draft is verified on).
    Any feature head: an EAGLE-3 head reads ``aux`` (divided by ``scale`` while fc trains on standardised
    features; None: the raw features a saved head reads), an EAGLE-1 head ``hidden`` (``with_hidden``)."""
    was = head.training
    head.eval()
    ok = torch.zeros(steps)
    n_alive = 0
    eagle3 = isinstance(head, Eagle3DraftHead)
    vocab = head.vocab_ids_or_all() if eagle3 else head.vocab_ids_on("cpu")
    for seq in seqs:
        ids, lf, n = seq["ids"], seq["loss_from"], seq["ids"].numel()
        if n - 1 - lf < 1:
            continue
        if eagle3:
            feats = seq["aux"].float() if scale is None else seq["aux"].float() / scale
        elif "hidden" in seq:
            feats = seq["hidden"].float()
        else:
            raise ValueError("heldout_acceptance: an EAGLE-1 head reads the target's last hidden state; load the "
                             "held-out jobs with with_hidden(target, data, refs)")
        logits = unrolled_logits(head, ids, feats, steps, lf)
        rows = torch.arange(lf, n - 1)
        pad_ids = torch.cat([ids, ids.new_zeros(steps + 1)])
        pad_teach = torch.cat([seq["teach"], torch.zeros(steps + 1, dtype=torch.bool)])
        pad_top = torch.cat([seq["top"], seq["top"].new_zeros(steps + 1)])
        alive = torch.ones(rows.numel(), dtype=torch.bool)
        for i in range(steps):
            alive &= pad_teach[rows + 1 + i]
            if i < steps - 1:
                alive &= pad_ids[rows + 2 + i] == pad_top[rows + 1 + i]
        n_alive += int(alive.sum())
        for i, lg in enumerate(logits):
            pick = lg.max(-1).indices
            alive = alive & ((pick if vocab is None else vocab[pick]) == pad_top[rows + 1 + i])
            ok[i] += alive.sum()
    head.train(was)
    chain = [float(ok[i] / n_alive) if n_alive else None for i in range(steps)]
    cond = [chain[0]] + [float(ok[i] / ok[i - 1]) if ok[i - 1] else None for i in range(1, steps)]
    return {"chain": chain, "conditional": cond, "positions": n_alive, "expected_accepted": sum(c or 0.0 for c in chain)}


@torch.no_grad()
def evaluate_head(target, head, data_dir: str, features_dir: str | None = None, heldout_jobs: int = 100,
                  steps: int = 3, progress: bool = True) -> dict:
    """``heldout_acceptance`` of a saved head (any feature head: the shipped EAGLE-1 one too) on the data
    set's first ``heldout_jobs`` held-out jobs, the positions every scaling run is measured on."""
    data = SelfDistillData(data_dir, features_dir)
    held = data.refs("heldout", limit=heldout_jobs)
    if not held:
        raise ValueError(f"the data set in {data_dir} has no held-out jobs")
    data.ensure_features(target, held, progress)
    seqs = [data.load(r) for r in held] if isinstance(head, Eagle3DraftHead) else with_hidden(target, data, held)
    return heldout_acceptance(head, seqs, None, steps)


def with_hidden(target, data: SelfDistillData, refs: list[dict]) -> list[dict]:
    """Jobs with the target's post-norm last hidden state (recomputed: the store keeps the fused features)."""
    lm = StaticBatchLM(target, 1, data.meta["config"]["capacity"])
    out = []
    for ref in refs:
        seq = data.load(ref)
        lm.reset(0)
        seq["hidden"] = lm.prefill(0, seq["ids"]).hidden.float()
        out.append(seq)
    return out


def train_selfdistilled(target, data_dir: str, out_dir: str, config: SelfDistillTrainConfig | None = None,
                        features_dir: str | None = None, progress: bool = True) -> dict:
    """Train (or resume training) an EAGLE-3 head on the data set in ``data_dir``; writes the head (the
    published EAGLE-3 layout), ``report.json`` (held-out acceptance, draft-vocabulary coverage, data size,
    wall-clock) and ``training.png``; returns the report."""
    import time

    cfg = config or SelfDistillTrainConfig()
    cfg.validate()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = SelfDistillData(data_dir, features_dir)
    train = data.refs("train", cfg.reply_tokens)
    held = data.refs("heldout", limit=cfg.heldout_jobs)
    if not train or not held:
        raise ValueError(f"{data_dir}: no training jobs ({len(train)}) or held-out jobs ({len(held)}) committed yet")
    data.ensure_features(target, train + held, progress)
    V = hf.vocab_size(target)
    vocab_ids = reply_vocabulary(data, train, min(cfg.draft_vocab, V), V)
    head = new_eagle3_head(target, vocab_ids, data.feature_layers, extra_layers=cfg.layers - 1)
    sample = with_hidden(target, data, train[:cfg.probe_jobs])
    X = torch.cat([s["aux"].float() for s in sample])
    rms = X.pow(2).mean(0).sqrt()
    scale = rms.clamp(min=1e-3 * float(rms.mean()) + 1e-12)  # fc trains on standardised features (eagle3_head)
    probe = probe_init(head, [{**s, "aux": s["aux"].float() / scale} for s in sample])
    del sample, X
    held_seqs = [data.load(r) for r in held]
    params = [p for n, p in head.named_parameters() if p.requires_grad and not n.startswith("embed_tokens")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    device = next(head.parameters()).device
    dtype = precision.resolve(cfg.precision, device)

    def step_loss(ref):
        seq = data.load(ref)
        with precision.autocast(dtype, device):
            loss, ces, accs, _ = ttt_losses(head, seq, scale, cfg)
        return loss, {"loss": loss.item(), "ce": ces, "top1": accs,
                      "positions": int(seq["teach"].sum())}

    state = train_loop(head, opt, params, train, cfg, out_dir, step_loss, "training the EAGLE-3 head", progress,
                       frozen=("embed_tokens",))
    validation = heldout_acceptance(head, held_seqs, scale, cfg.steps)
    with torch.no_grad():
        head.fc.weight.div_(scale.to(head.fc.weight))  # the saved head reads the raw features
    head.save_pretrained(out_dir)
    report = {"config": asdict(cfg), "data": {"dir": data_dir, "config": _config_dict_of(data),
                                              "train_jobs": len(train),
                                              "train_reply_tokens": sum(b - a for r in train for a, b, _ in r["replies"]),
                                              "heldout_jobs": len(held), "heldout_positions": validation["positions"]},
              "precision": str(dtype).replace("torch.", ""), "draft_vocab": int(vocab_ids.numel()), "draft_vocab_coverage_heldout": coverage(data, held, vocab_ids, V),
              "probe_residual": probe, "steps": state["step"], "heldout": validation,
              "wall_clock_s": round(time.perf_counter() - t_start, 1), "history": state["history"]}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_history(state["history"], os.path.join(out_dir, "training.png"))
    finish_training(out_dir)
    return report


def _config_dict_of(data: SelfDistillData) -> dict:
    return {k: data.meta["config"][k] for k in ("max_new_tokens", "capacity", "sample_share", "kv_dtype", "seed")}
