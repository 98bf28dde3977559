"""Training of the C2T classifier from a tree dataset (paper App. B).

Balanced negative sampling (all positives plus ``neg_ratio`` times as many negatives, re-drawn every
epoch; by default half of them at the positives' depths), a train/validation split by tree, Adam,
BCE-with-logits, and checkpoint selection either by validation recall at the threshold first, then the
lowest positive rate (the fraction of nodes the classifier would keep at the threshold, which drives the
verified-token count), or by the validation average precision (how well the confidence ranks accepted
nodes above the rest over every threshold). Fine-tuning mode: start from a trained classifier, lr 1e-4,
on a fraction of the new data's trees.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..decoding.classifier import C2TClassifier, ClassifierConfig
from .tree_dataset import open_tree_dataset


@dataclass
class TrainConfig:
    lr: float | None = None  # 1e-3, or 1e-4 when fine-tuning (the paper's values)
    batch_size: int = 64
    epochs: int = 10
    min_steps: int = 1500  # more epochs when the data is small: a few hundred positives need them
    neg_ratio: float = 1.0
    # "depth_matched": half of each epoch's negatives drawn at the positives' depths (as many per depth as
    # positives there), half uniformly; "uniform": all uniformly over nodes (most nodes are deep, so a
    # few hundred positives teach "shallow = keep" and nothing about P and H among the root's children)
    neg_sampling: str = "depth_matched"
    val_fraction: float = 0.1
    threshold: float = 0.5  # beta at which recall / positive rate are measured
    recall_tolerance: float = 0.005  # recalls this close count as "similar"; then the lower positive rate wins
    # "average_precision": the ranking over all thresholds; "recall": recall at ``threshold``, then the
    # positive rate (the paper's rule). The recall rule favours early, keep-everything epochs when
    # positives are rare: from scratch on 1,114 trees it took epoch 3 of 41, whose top-1% recall on trees
    # no run saw was 0.28 against 0.42 for average precision's epoch 39 (benchmarks/classifier_ranking.py).
    select_by: str = "average_precision"
    seed: int = 0
    finetune_from: str | None = None
    finetune_fraction: float = 0.1  # of the new data's trees, in fine-tuning mode
    model: ClassifierConfig = field(default_factory=ClassifierConfig)

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.finetune_from is not None else 1e-3


SELECT_BY = ("average_precision", "recall")  # TrainConfig.select_by


def select_epoch(history: list[dict], tolerance: float, by: str = "recall") -> int:
    """Index of the selected checkpoint. ``by="recall"``: the best recall; among those within
    ``tolerance`` of it, the one with the lowest positive rate (earliest on ties).
    ``by="average_precision"``: the highest validation average precision (earliest on ties; NaN, a
    validation split without positives, counts as lowest)."""
    if by == "average_precision":
        ap = [h["average_precision"] for h in history]
        return max(range(len(history)), key=lambda i: (ap[i] if ap[i] == ap[i] else -1.0, -i))
    if by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {SELECT_BY}, got {by!r}")
    best_recall = max(h["recall"] for h in history)
    close = [i for i, h in enumerate(history) if h["recall"] >= best_recall - tolerance]
    return min(close, key=lambda i: (history[i]["positive_rate"], i))


def sample_negatives(neg_idx: np.ndarray, neg_depth: np.ndarray, pos_depth: np.ndarray, n: int, how: str,
                     rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` negatives (see ``TrainConfig.neg_sampling``)."""
    if how == "uniform":
        return rng.choice(neg_idx, size=n, replace=False)
    if how != "depth_matched":
        raise ValueError(f"neg_sampling must be 'uniform' or 'depth_matched', got {how!r}")
    picked = []
    depths, counts = np.unique(pos_depth, return_counts=True)
    for d, c in zip(depths, counts):
        pool = neg_idx[neg_depth == d]
        k = min(len(pool), int(round(c * n / (2 * len(pos_depth)))))
        picked.append(rng.choice(pool, size=k, replace=False))
    matched = np.concatenate(picked) if picked else np.empty(0, np.int64)
    rest = np.setdiff1d(neg_idx, matched, assume_unique=True)
    return np.concatenate([matched, rng.choice(rest, size=min(len(rest), n - len(matched)), replace=False)])


def _features(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([rows["P"], rows["H"], rows["d"].astype(np.float32)], -1))


def split_by_tree(trees: np.ndarray, val_fraction: float, rng: np.random.Generator):
    """Boolean masks (train, val) over rows; whole trees go to one side."""
    ids = np.unique(trees)
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    val_ids = rng.choice(ids, size=n_val, replace=False)
    val = np.isin(trees, val_ids)
    return ~val, val


def training_split(trees: np.ndarray, cfg: TrainConfig, rng: np.random.Generator):
    """Boolean masks (train, val) over all rows of a tree dataset, as ``train_classifier`` draws them
    from ``rng`` (seeded with ``cfg.seed``): in fine-tuning mode only ``cfg.finetune_fraction`` of the
    trees take part, and rows of the others are in neither mask. Recomputable from a report's config,
    so a later evaluation can use trees the classifier never saw."""
    if cfg.finetune_from is None:
        return split_by_tree(trees, cfg.val_fraction, rng)
    ids = np.unique(trees)
    keep = rng.choice(ids, size=max(2, int(round(len(ids) * cfg.finetune_fraction))), replace=False)
    sub = np.isin(trees, keep)
    train_sub, val_sub = split_by_tree(trees[sub], cfg.val_fraction, rng)
    train, val = np.zeros(len(trees), bool), np.zeros(len(trees), bool)
    train[sub], val[sub] = train_sub, val_sub
    return train, val


def ranking_metrics(confidence: torch.Tensor, labels: torch.Tensor, shares=(0.01,)) -> dict:
    """How well ``confidence`` [N] ranks the accepted nodes (``labels`` [N], 1 = accepted) first:
    ``average_precision`` (mean precision at each accepted node's rank) and ``recall_top{x}`` (the
    share of accepted nodes among the top ``x`` of nodes; x in ``shares``, as fractions)."""
    pos = labels > 0.5
    n_pos = int(pos.sum())
    if n_pos == 0:
        return {"average_precision": float("nan"), **{f"recall_top{s:g}": float("nan") for s in shares}}
    hits = pos[torch.argsort(confidence, descending=True, stable=True)].double()
    cum = torch.cumsum(hits, 0)
    ranks = torch.arange(1, len(hits) + 1, dtype=torch.float64)
    out = {"average_precision": (cum / ranks)[hits > 0].mean().item()}
    for s in shares:
        out[f"recall_top{s:g}"] = cum[max(1, int(round(s * len(hits)))) - 1].item() / n_pos
    return out


@torch.no_grad()
def evaluate(model: C2TClassifier, feats: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    logits = torch.cat([model(feats[i:i + 65536]) for i in range(0, len(feats), 65536)]) if len(feats) else feats[:, 0]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item() if len(feats) else float("nan")
    pred = torch.sigmoid(logits) >= threshold
    pos = labels > 0.5
    recall = (pred & pos).sum().item() / max(1, pos.sum().item())
    return {"val_loss": loss, "recall": recall, "positive_rate": pred.float().mean().item() if len(feats) else 0.0,
            **ranking_metrics(logits, labels)}


def train_classifier(data: str, out: str, config: TrainConfig | None = None, progress: bool = True) -> dict:
    """Train on the tree dataset at ``data``; write the selected classifier, ``report.json`` and
    ``training.png`` to ``out``. Returns the report."""
    cfg = config or TrainConfig()
    if cfg.select_by not in SELECT_BY:  # before reading the data or writing anything
        raise ValueError(f"select_by must be one of {SELECT_BY}, got {cfg.select_by!r}")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = open_tree_dataset(data)
    if len(rows) == 0:
        raise ValueError(f"{data} holds no rows")
    trees = np.asarray(rows["tree"])
    train_mask, val_mask = training_split(trees, cfg, rng)
    val_trees = np.unique(trees[val_mask])
    labels_all = np.asarray(rows["label"])
    pos_idx = np.flatnonzero(train_mask & (labels_all == 1))
    neg_idx = np.flatnonzero(train_mask & (labels_all == 0))
    if len(pos_idx) == 0:
        raise ValueError(f"{data}: the training split holds no positive rows")
    val_rows = rows[val_mask]
    val_feats, val_labels = _features(val_rows), torch.from_numpy(val_rows["label"].astype(np.float32))

    model = C2TClassifier.from_pretrained(cfg.finetune_from) if cfg.finetune_from else C2TClassifier(cfg.model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate())
    n_neg = min(len(neg_idx), int(round(len(pos_idx) * cfg.neg_ratio)))
    depth_all = np.asarray(rows["d"])
    neg_depth, pos_depth = depth_all[neg_idx], depth_all[pos_idx]
    steps_per_epoch = -(-(len(pos_idx) + n_neg) // cfg.batch_size)
    n_epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    history, states = [], []
    epochs = tqdm(range(n_epochs), desc="classifier", disable=not progress)
    for epoch in epochs:
        idx = np.concatenate([pos_idx, sample_negatives(neg_idx, neg_depth, pos_depth, n_neg, cfg.neg_sampling, rng)])
        batch_rows = rows[np.sort(idx)]  # sorted reads from the memory map
        feats = _features(batch_rows)
        labels = torch.from_numpy(batch_rows["label"].astype(np.float32))
        perm = torch.randperm(len(feats))
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(feats[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        model.eval()
        stats = {"epoch": epoch, "train_loss": total / len(perm), **evaluate(model, val_feats, val_labels, cfg.threshold)}
        model.train()
        history.append(stats)
        states.append(copy.deepcopy(model.state_dict()))
        epochs.set_postfix(loss=f"{stats['train_loss']:.4f}", recall=f"{stats['recall']:.3f}",
                           pos_rate=f"{stats['positive_rate']:.4f}")
    best = select_epoch(history, cfg.recall_tolerance, cfg.select_by)
    model.load_state_dict(states[best])
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    report = {
        "data": os.path.abspath(data), "rows": int((train_mask | val_mask).sum()), "train_positives": int(len(pos_idx)),
        "train_negatives_per_epoch": n_neg, "epochs": n_epochs, "steps": n_epochs * steps_per_epoch,
        "val_rows": int(len(val_rows)),
        "val_positives": int(val_labels.sum().item()), "val_trees": val_trees.tolist(),
        "selected_epoch": best, "selected": history[best],
        "history": history, "config": asdict(cfg),
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_training(report, model, os.path.join(out, "training.png"))
    return report


def plot_training(report: dict, model: C2TClassifier, path: str) -> None:
    """Loss curves, and the confidence as a function of P at several H and d (paper App. D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ep = [h["epoch"] for h in hist]
    axes[0].plot(ep, [h["train_loss"] for h in hist], label="train (balanced)")
    axes[0].plot(ep, [h["val_loss"] for h in hist], label="validation (all nodes)")
    axes[0].axvline(report["selected_epoch"], color="grey", ls=":", label="selected")
    axes[0].set(xlabel="epoch", ylabel="BCE", title="loss")
    axes[0].legend()
    P = torch.linspace(0, 1, 200)
    with torch.no_grad():
        for H in (0.5, 2.0, 4.0, 6.0):
            axes[1].plot(P, model.confidence(torch.stack([P, torch.full_like(P, H), torch.zeros_like(P)], -1)),
                         label=f"H={H}")
        for d in (0, 2, 5, 9):
            axes[2].plot(P, model.confidence(torch.stack([P, torch.full_like(P, 2.0), torch.full_like(P, d)], -1)),
                         label=f"d={d}")
    axes[1].set(xlabel="P", ylabel="C", title="confidence vs P (d = 0)")
    axes[2].set(xlabel="P", ylabel="C", title="confidence vs P (H = 2)")
    for ax in axes[1:]:
        ax.axhline(0.5, color="grey", ls=":")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
