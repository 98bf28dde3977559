"""The draft head's scaling curve and ablations on the self-distilled data set (issue #28), resumable.

    python -m experiments.selfdistill.study --data experiments/results/selfdistill \
        --out experiments/results/selfdistill_heads --phase scaling --sizes 250000,1000000,2500000,5000000
    python -m experiments.selfdistill.study ... --phase ablation --budget 1000000   # 1 vs 2 layers, soft vs hard
    python -m experiments.selfdistill.study ... --phase report                       # table + plot only

Every run trains with ``c2t_fast.training.selfdistill_train`` and measures held-out acceptance of the
1st / 2nd / 3rd drafted token on the same held-out conversations; a size the data set does not hold yet
is skipped (rerun the phase when the data has grown). Results: ``<out>/<run>/report.json`` (the head beside
it), ``<out>/study.json``, ``<out>/scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_name(reply_tokens: int, loss: str = "soft", layers: int = 1) -> str:
    return f"r{reply_tokens // 1000}k_{loss}_l{layers}"


def _train(target, args, reply_tokens: int, loss: str, layers: int) -> dict | None:
    from c2t_fast.training.selfdistill_train import SelfDistillTrainConfig, train_selfdistilled

    out = os.path.join(args.out, run_name(reply_tokens, loss, layers))
    done = os.path.join(out, "report.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    with open(os.path.join(args.data, "meta.json")) as f:
        have = json.load(f)["reply_tokens"]
    if have < reply_tokens:
        print(f"skipping {run_name(reply_tokens, loss, layers)}: the data set holds {have} reply tokens", flush=True)
        return None
    cfg = SelfDistillTrainConfig(reply_tokens=reply_tokens, loss=loss, layers=layers, epochs=args.epochs, lr=args.lr,
                                 draft_vocab=args.draft_vocab)
    return train_selfdistilled(target, args.data, out, cfg, features_dir=args.features_dir)


def report(out: str) -> dict:
    rows = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        path = os.path.join(out, name, "report.json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            rows.append({"run": name, "reply_tokens": r["data"]["train_reply_tokens"], "loss": r["config"]["loss"],
                         "layers": r["config"]["layers"], "chain": r["heldout"]["chain"],
                         "conditional": r["heldout"]["conditional"], "expected_accepted": r["heldout"]["expected_accepted"],
                         "positions": r["heldout"]["positions"], "coverage": r["draft_vocab_coverage_heldout"],
                         "wall_clock_s": r["wall_clock_s"]})
    summary = {"runs": rows}
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = ["| run | reply tokens | 1st | 2nd given 1st | 3rd given 2 | E[accepted of 3] | vocab coverage | wall-clock |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["loss"], r["layers"], r["reply_tokens"])):
        c = [f"{x:.3f}" if x is not None else "-" for x in r["conditional"]]
        lines.append(f"| {r['run']} | {r['reply_tokens']:,} | {c[0]} | {c[1]} | {c[2]} | {r['expected_accepted']:.3f} | "
                     f"{r['coverage']:.3f} | {r['wall_clock_s'] / 60:.0f} min |")
    summary["table"] = "\n".join(lines)
    curve = sorted((r for r in rows if r["loss"] == "soft" and r["layers"] == 1), key=lambda r: r["reply_tokens"])
    if curve:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, label in enumerate(("1st drafted token", "2nd given the 1st", "3rd given the first 2")):
            ax.plot([r["reply_tokens"] for r in curve], [r["conditional"][i] for r in curve], marker="o", label=label)
        ax.set(xscale="log", xlabel="training reply tokens (the target's own)", ylabel="held-out acceptance",
               title="EAGLE-3 head on SmolLM2-135M's own replies")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "scaling.png"), dpi=110)
        plt.close(fig)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--features-dir", default=None)
    ap.add_argument("--phase", choices=("scaling", "ablation", "report"), default="scaling")
    ap.add_argument("--sizes", default="250000,1000000,2500000,5000000")
    ap.add_argument("--budget", type=int, default=1_000_000, help="reply tokens of the ablation runs")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--draft-vocab", type=int, default=16384)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.phase != "report":
        from c2t_fast.hf.loading import load_target

        target, _ = load_target(fast_linear=False)
        if args.phase == "scaling":
            for n in (int(x) for x in args.sizes.split(",")):
                _train(target, args, n, "soft", 1)
        else:
            for loss, layers in (("soft", 1), ("hard", 1), ("soft", 2)):
                _train(target, args, args.budget, loss, layers)
    print(report(args.out)["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
