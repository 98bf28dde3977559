"""Summaries of finished WISCA experiment runs: JSON, a markdown table and plots."""

from __future__ import annotations

import glob
import json
import os

from .common import compare, mean_spread

# which runs each configuration is compared with
REFERENCE = {"mha_wisca": "mha_baseline"}


def _runs(out: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(out, "*", "seed*.json"))):
        r = json.load(open(path))
        runs.setdefault(r["config"], []).append(r)
    return runs


def summarize(out: str, metrics: tuple[str, ...], reference=REFERENCE, base: str = "baseline") -> dict:
    runs = _runs(out)
    summary = {}
    for config, rs in runs.items():
        summary[config] = {"seeds": sorted(r["seed"] for r in rs),
                           **{m: mean_spread([r[m] for r in sorted(rs, key=lambda r: r["seed"])]) for m in metrics}}
    for config, s in summary.items():
        ref = reference.get(config, base)
        if config != ref and ref in summary:
            s["vs"] = ref
            for m in metrics:
                s[f"{m}_vs_ref"] = compare(summary[ref][m], s[m])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def markdown_table(summary: dict, metrics: tuple[str, ...], labels: dict[str, str]) -> str:
    head = "| config | seeds | " + " | ".join(f"{labels[m]} (mean ± std) | Δ vs ref | > spread?" for m in metrics) + " |"
    rows = [head, "|" + "---|" * (2 + 3 * len(metrics))]
    for config, s in summary.items():
        cells = [config, str(len(s["seeds"]))]
        for m in metrics:
            ms = s[m]
            cells.append(f"{ms['mean']:.4f} ± {ms['std']:.4f}")
            c = s.get(f"{m}_vs_ref")
            cells += ([f"{c['rel'] * 100:+.2f}% vs {s['vs']}", "yes" if c["exceeds_spread"] else "no"] if c
                      else ["—", "—"])
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _smooth(xs: list[float], k: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(out: str, key: str, ylabel: str, file: str, evals_key: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(out)
    fig, axes = plt.subplots(1, 2 if evals_key else 1, figsize=(13 if evals_key else 7, 4.2), squeeze=False)
    for i, (config, rs) in enumerate(sorted(runs.items())):
        color = f"C{i % 10}"
        for j, r in enumerate(rs):
            axes[0][0].plot(_smooth(r[key]), color=color, lw=0.8, alpha=0.8, label=config if j == 0 else None)
            if evals_key:
                steps, vals = zip(*r[evals_key])
                axes[0][1].plot(steps, vals, color=color, marker=".", lw=0.8, label=config if j == 0 else None)
    axes[0][0].set(xlabel="optimizer step", ylabel=ylabel, title=f"{ylabel} (moving average, every seed)")
    axes[0][0].legend(fontsize=7)
    if evals_key:
        axes[0][1].set(xlabel="optimizer step", ylabel="validation loss", title="validation loss (every seed)")
        axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, file), dpi=110)
    plt.close(fig)


def write_report(out: str, labels: dict[str, str]) -> dict:
    """summary.json, summary.md (mean ± std per config, vs its reference) and loss_curves.png."""
    summary = summarize(out, tuple(labels))
    table = markdown_table(summary, tuple(labels), labels)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table)
    plot_curves(out, "history", "train loss", "loss_curves.png", evals_key="evals")
    print(table)
    return summary


def write_pretrain_report(out: str) -> dict:
    return write_report(out, {"final_train_loss": "train loss (last --tail steps)", "val_loss": "val loss", "val_ppl": "val PPL"})


def write_lora_report(out: str) -> dict:
    return write_report(out, {"final_train_loss": "train loss (last --tail steps)", "val_loss": "val loss"})


def write_draft_report(out: str) -> dict:
    runs = _runs(out)
    rows = ["| config | held-out top-1 | held-out CE | tau (MT-bench, EAGLE-2) | gamma |", "|---|---|---|---|---|"]
    summary = {}
    for config, rs in sorted(runs.items()):
        for r in rs:
            summary[config] = {k: r[k] for k in ("val_top1", "val_cls", "tau", "gamma", "steps")}
            rows.append(f"| {config} | {r['val_top1']:.4f} | {r['val_cls']:.3f} | {r['tau']:.3f} | {r['gamma']} |")
    table = "\n".join(rows) + "\n"
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for config, rs in sorted(runs.items()):
        h = rs[0]["history"]
        ax.plot([x["step"] for x in h], _smooth([x["cls"] for x in h], 10), label=config)
    ax.set(xlabel="optimizer step", ylabel="token CE (training, moving average)", title="draft head: WISCA vs baseline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    plt.close(fig)
    print(table)
    return summary
