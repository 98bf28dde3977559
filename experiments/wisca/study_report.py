"""Tables and plots of the WISCA study (``experiments.wisca.study``): every configuration at its own
best learning rate, the whole loss-vs-LR grid, and the follow-up configurations beside the baseline,
WISCA and init-only WISCA at the same learning rate."""

from __future__ import annotations

import json
import os

from .common import compare, mean_spread
from .report import _smooth
from .study import FOLLOWUP, SWEEP, best_lrs, results

METRICS = ("val_loss", "val_ppl", "final_train_loss")


def summarize(out: str, found: dict) -> dict:
    groups = sorted({g for g, _, _ in found})
    summary: dict = {}
    for g in groups:
        ranked = {c: best_lrs(found, g, c) for c in (*SWEEP, *FOLLOWUP)}
        configs = [c for c, r in ranked.items() if r]
        grid = {c: {f"{lr:g}": {m: mean_spread([r[m] for r in sorted(rs, key=lambda r: r["seed"])]) for m in METRICS}
                    for (gg, cc, lr), rs in sorted(found.items()) if gg == g and cc == c} for c in configs}
        best = {c: {"lr": ranked[c][0][0], **grid[c][f"{ranked[c][0][0]:g}"]} for c in configs}
        base = best.get("baseline")
        for c, b in best.items():
            if base and c != "baseline":
                b["vs_baseline_at_its_best"] = {m: compare(base[m], b[m]) for m in ("val_loss", "val_ppl")}
        summary[f"g{g}"] = {"grid": grid, "best": best}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _ms(x: dict, digits: int = 4) -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def markdown(summary: dict) -> str:
    lines = []
    for gname, s in summary.items():
        grid, best = s["grid"], s["best"]
        lrs = sorted({lr for c in grid.values() for lr in c}, key=float)
        lines += [f"### GQA group {gname[1:]}", "", "Each configuration at its own best learning rate "
                  "(lowest mean validation loss over the seeds):", "",
                  "| config | best LR | seeds | val loss | val PPL | Δ val PPL vs baseline at its best | > spread? |",
                  "|---|---|---|---|---|---|---|"]
        for c, b in best.items():
            cmp = b.get("vs_baseline_at_its_best", {}).get("val_ppl")
            lines.append(f"| {c} | {b['lr']:g} | {b['val_loss']['n']} | {_ms(b['val_loss'])} | {_ms(b['val_ppl'], 2)} | "
                         + (f"{cmp['rel'] * 100:+.2f}% | {'yes' if cmp['exceeds_spread'] else 'no'} |" if cmp
                            else "— | — |"))
        lines += ["", "Validation loss at every learning rate (mean ± std over seeds):", "",
                  "| config | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for c, row in grid.items():
            lines.append(f"| {c} | " + " | ".join(_ms(row[lr]["val_loss"]) if lr in row else "" for lr in lrs) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_sweep(out: str, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6.5 * len(summary), 4.5), squeeze=False)
    for ax, (gname, s) in zip(axes[0], summary.items()):
        for i, (c, row) in enumerate(s["grid"].items()):
            lrs = sorted(row, key=float)
            x = [float(lr) for lr in lrs]
            y = [row[lr]["val_loss"]["mean"] for lr in lrs]
            e = [row[lr]["val_loss"]["std"] for lr in lrs]
            style = dict(marker="o", lw=1.2) if c in SWEEP else dict(marker="s", lw=0, elinewidth=1.2)
            ax.errorbar(x, y, yerr=e, color=f"C{i % 10}", capsize=3, label=c, **style)
        ax.set(xscale="log", xlabel="peak learning rate (AdamW, cosine)", ylabel="validation loss (mean ± std)",
               title=f"GQA group {gname[1:]}: loss vs learning rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_sweep.png"), dpi=110)
    plt.close(fig)


def plot_curves(out: str, summary: dict, found: dict) -> None:
    """Every configuration at its best LR, mean over seeds: train loss (moving average 100), and its train
    and validation loss minus the baseline's (the curves themselves overlap at this scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summary), 3, figsize=(18, 4 * len(summary)), squeeze=False)
    for row, (gname, s) in zip(axes, summary.items()):
        g = int(gname[1:])
        mean_train, mean_val = {}, {}
        for c, b in s["best"].items():
            rs = found[(g, c, b["lr"])]
            smoothed = [_smooth(r["history"], 100) for r in rs]
            mean_train[c] = [sum(x) / len(x) for x in zip(*smoothed)]
            steps = [e[0] for e in rs[0]["evals"]]
            mean_val[c] = (steps, [sum(x) / len(x) for x in zip(*[[e[1] for e in r["evals"]] for r in rs])])
        for i, (c, b) in enumerate(s["best"].items()):
            label, color = f"{c} (lr {b['lr']:g})", f"C{i % 10}"
            row[0].plot(mean_train[c], color=color, lw=0.9, label=label)
            if "baseline" in mean_train:
                base = mean_train["baseline"]
                row[1].plot([a - b_ for a, b_ in zip(mean_train[c], base)], color=color, lw=0.9, label=label)
                steps, vals = mean_val[c]
                bsteps, bvals = mean_val["baseline"]
                if steps == bsteps:
                    row[2].plot(steps[1:], [a - b_ for a, b_ in zip(vals[1:], bvals[1:])], color=color, marker="o",
                                lw=0.9, label=label)
        row[0].set(xlabel="optimizer step", ylabel="train loss (moving average 100)", title=f"{gname}: train loss, seed mean")
        row[1].set(xlabel="optimizer step", ylabel="Δ train loss vs baseline", title=f"{gname}: train loss − baseline's")
        row[2].set(xlabel="optimizer step", ylabel="Δ validation loss vs baseline",
                   title=f"{gname}: validation loss − baseline's")
        for ax in row:
            ax.legend(fontsize=7)
        row[1].axhline(0, color="k", lw=0.5)
        row[2].axhline(0, color="k", lw=0.5)
        row[1].set_ylim(-0.06, 0.1)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    plt.close(fig)


def compact_runs(out: str, found: dict, every: int = 100) -> list[dict]:
    """Every finished run without its per-step losses (``train_loss_means``: means over ``every`` steps),
    small enough to keep in the repository beside the summary; written to ``OUT/runs.json``."""
    rows = []
    for _, rs in sorted(found.items()):
        for r in sorted(rs, key=lambda r: r["seed"]):
            h = r["history"]
            rows.append({**{k: r[k] for k in ("group", "config", "lr", "seed", "val_loss", "val_ppl",
                                               "final_train_loss", "evals", "transitions", "init_factors",
                                               "seconds", "params")},
                         "train_loss_means": [sum(h[i:i + every]) / len(h[i:i + every]) for i in range(0, len(h), every)]})
    with open(os.path.join(out, "runs.json"), "w") as f:
        json.dump(rows, f)
    return rows


def write_study_report(out: str) -> dict:
    """summary.json, summary.md, runs.json, lr_sweep.png and loss_curves.png from the finished runs."""
    found = results(out)  # every run's JSON, read once
    summary = summarize(out, found)
    compact_runs(out, found)
    text = markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    if summary:
        plot_sweep(out, summary)
        plot_curves(out, summary, found)
    print(text)
    return summary
