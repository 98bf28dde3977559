"""How well C2T classifiers rank the accepted nodes of a tree dataset, on trees none of them trained on.

C2T keeps a node when its confidence is at least beta, so a classifier is as good as its ranking: the
share of accepted nodes it keeps (recall) for the share of all nodes it keeps (what verification pays).
This compares classifiers on the same held-out trees: recall among the top 0.5 / 1 / 2 / 5% of nodes by
confidence, average precision, and recall / kept share at beta 0.5 and 0.7; and plots recall against
the share kept. The first row ranks by the joint probability P alone (EAGLE-2's score, no classifier):
a classifier that does not rank better than its own input P cannot make C2T's trees smaller than
EAGLE-2's at equal acceptance.

    python benchmarks/classifier_ranking.py --trees runs/trees --out runs/classifier_ranking \\
        --holdout-of c2t_fast/data/classifier --holdout-of runs/clf_scratch \\
        shipped=c2t_fast/data/classifier scratch=runs/clf_scratch previous=runs/old_classifier

``--holdout-of``: classifiers trained on (part of) ``--trees``; the trees in their training splits are
left out (recomputed from each report's config, or read from its ``val_trees``). Classifiers trained on
other data need not be listed.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from c2t_fast.decoding.classifier import C2TClassifier
from c2t_fast.training.classifier import TrainConfig, _features, ranking_metrics, training_split
from c2t_fast.training.tree_dataset import open_tree_dataset

SHARES = (0.005, 0.01, 0.02, 0.05)
BETAS = (0.5, 0.7)


def held_out_trees(trees: np.ndarray, classifier_dir: str) -> np.ndarray:
    """Tree ids the classifier at ``classifier_dir`` did not train on (its validation trees, or every tree
    outside its fine-tuning subset)."""
    with open(os.path.join(classifier_dir, "report.json")) as f:
        report = json.load(f)
    if "val_trees" in report and report["config"].get("finetune_from") is None:
        return np.asarray(report["val_trees"])
    cfg = report["config"]
    tc = TrainConfig(val_fraction=cfg["val_fraction"], seed=cfg["seed"], finetune_from=cfg.get("finetune_from"),
                     finetune_fraction=cfg.get("finetune_fraction", 0.1))
    train, _ = training_split(trees, tc, np.random.default_rng(tc.seed))
    return np.setdiff1d(np.unique(trees), np.unique(trees[train]))


def rank_scores(conf: torch.Tensor, labels: torch.Tensor, thresholds: bool = True) -> dict:
    """Ranking metrics of scores ``conf`` [N] against ``labels`` [N]; with ``thresholds``, also the recall
    and kept share at each beta in BETAS (for confidences in [0, 1])."""
    out = ranking_metrics(conf, labels, SHARES)
    pos = labels > 0.5
    for b in BETAS if thresholds else ():
        keep = conf >= b
        out[f"recall_beta{b}"] = (keep & pos).sum().item() / max(1, int(pos.sum()))
        out[f"kept_beta{b}"] = keep.float().mean().item()
    order = torch.argsort(conf, descending=True, stable=True)
    curve = torch.cumsum(pos[order].double(), 0) / max(1, int(pos.sum()))
    idx = np.unique(np.geomspace(1, len(conf), 200).astype(np.int64)) - 1
    out["curve"] = {"kept": ((idx + 1) / len(conf)).tolist(), "recall": curve[idx].tolist()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", required=True, help="tree dataset (c2t-fast collect-trees)")
    p.add_argument("--holdout-of", action="append", default=[], help="a classifier trained on --trees (its "
                   "training trees are left out); repeatable")
    p.add_argument("--out", required=True, help="directory for ranking.json, ranking.md, ranking.png")
    p.add_argument("classifiers", nargs="+", help="NAME=DIR or DIR")
    args = p.parse_args()

    rows = np.asarray(open_tree_dataset(args.trees))
    trees = rows["tree"]
    keep = np.unique(trees)
    for d in args.holdout_of:
        keep = np.intersect1d(keep, held_out_trees(trees, d))
    if len(keep) == 0:
        raise SystemExit("no tree is held out of every classifier in --holdout-of")
    sel = rows[np.isin(trees, keep)]
    feats, labels = _features(sel), torch.from_numpy(sel["label"].astype(np.float32))
    result = {"trees": args.trees, "held_out_trees": int(len(keep)), "nodes": int(len(sel)),
              "accepted": int(labels.sum()), "classifiers": {}}
    result["classifiers"]["joint probability P (no classifier)"] = {
        "path": None, **rank_scores(torch.from_numpy(sel["P"].astype(np.float64)), labels, thresholds=False)}
    for spec in args.classifiers:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        with torch.no_grad():
            conf = torch.sigmoid(C2TClassifier.from_pretrained(path).eval()(feats).flatten().float())
        result["classifiers"][name] = {"path": path, **rank_scores(conf, labels)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ranking.json"), "w") as f:
        json.dump(result, f, indent=1)
    head = ["classifier", "avg precision"] + [f"recall top {s:.1%}" for s in SHARES] + \
        [f"recall / kept at β {b}" for b in BETAS]
    lines = [f"{result['held_out_trees']} held-out trees, {result['nodes']:,} nodes, {result['accepted']:,} accepted",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["classifiers"].items():
        cells = [name, f"{r['average_precision']:.3f}"] + [f"{r[f'recall_top{s:g}']:.3f}" for s in SHARES] + \
            [f"{r[f'recall_beta{b}']:.3f} / {r[f'kept_beta{b}']:.1%}" if f"recall_beta{b}" in r else "—"
             for b in BETAS]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "ranking.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in result["classifiers"].items():
        ax.plot(r["curve"]["kept"], r["curve"]["recall"], label=name)
    ax.set(xscale="log", xlabel="share of nodes kept (by confidence)", ylabel="share of accepted nodes kept",
           title=f"C2T classifiers on {result['held_out_trees']} held-out trees")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ranking.png"), dpi=100)


if __name__ == "__main__":
    main()
