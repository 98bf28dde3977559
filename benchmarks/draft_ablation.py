"""Draft heads side by side on the same held-out target outputs: greedy acceptance of the 1st, 2nd and
3rd token of a drafted chain (``training.unrolled.chain_acceptance``), the expected accepted length of
a chain of 3, the top-1 agreement of the first token, and each head's training budget.

The held-out sequences are either the last ``--held-out`` share of an EAGLE-3 feature cache (the split
every ``train-draft`` run on that cache holds out), or (``--distilled DIR``) fresh replies of the target
from ``c2t-fast distill-data`` that no head trained on, cached here with the fused features; greedy
replies only either way.

    c2t-fast distill-data --out runs/heldout --start 6000 --conversations 32 --batch-size 16 --sample-every 0
    python benchmarks/draft_ablation.py --distilled runs/heldout --cache runs/heldout_cache \
        --head "EAGLE-1, ShareGPT text (shipped)=default" --head "EAGLE-3, self-distilled=runs/draft3" \
        --out runs/draft_ablation.json > ablation.md
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True, help="feature cache written by train-draft --head eagle3 (or, with "
                                                  "--distilled, the directory to cache the held-out replies in)")
    p.add_argument("--distilled", default=None, help="held-out replies (c2t-fast distill-data): evaluate on all "
                                                     "of them instead of the cache's held-out share")
    p.add_argument("--head", action="append", required=True, metavar="LABEL=DIR",
                   help="a head directory ('default': the shipped head); repeatable")
    p.add_argument("--held-out", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--target", default="smollm2")
    p.add_argument("--out", default=None, help="JSON of the figures")
    p.add_argument("--plot", default=None, help="PNG: acceptance of the 1st, 2nd and 3rd drafted token per head")
    args = p.parse_args()

    from c2t_fast.decoding.drafts import eagle3_feature_layers
    from c2t_fast.decoding.drafts.loading import DEFAULT_DRAFT_DIR, load_draft
    from c2t_fast.hf.adapter import text_config
    from c2t_fast.hf.loading import load_target
    from c2t_fast.training.distill import distilled_sequences
    from c2t_fast.training.draft_head import cache_hidden_states, load_cached, split_validation
    from c2t_fast.training.unrolled import chain_acceptance

    target, _ = load_target(args.target)
    if args.distilled:
        layers = eagle3_feature_layers(text_config(target).num_hidden_layers)
        cache_hidden_states(target, distilled_sequences(args.distilled, 512, with_loss_from=True), args.cache,
                            10 ** 9, feature_layers=layers)
        val = load_cached(args.cache)
    else:
        _, val = split_validation(load_cached(args.cache), args.held_out)
    rows = []
    for spec in args.head:
        label, _, path = spec.partition("=")
        path = DEFAULT_DRAFT_DIR if path == "default" else path
        head = load_draft(path, target)
        t = time.perf_counter()
        acc = chain_acceptance(head, val, args.steps)
        report = os.path.join(path, "report.json")
        budget = None
        if os.path.isfile(report):
            with open(report) as f:
                r = json.load(f)
            budget = {"tokens": r.get("tokens"), "trained_positions": r.get("trained_positions"),
                      "epochs": r.get("config", {}).get("epochs")}
        rows.append({"head": label, "dir": path, **acc, "budget": budget, "eval_s": round(time.perf_counter() - t, 1)})
    where = f"replies in {args.distilled}" if args.distilled else f"cache {args.cache}, last {args.held_out:.0%}"
    print(f"Held-out: {rows[0]['positions']} positions of {sum(not s.get('sampled') for s in val)} greedy replies "
          f"({where}).\n")
    print("| head | training tokens (trained positions), epochs | 1st | 2nd given 1st | 3rd given 2 | "
          "expected accepted of 3 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b = r["budget"] or {}
        trained = f" ({b['trained_positions']:,})" if b.get("trained_positions") else ""
        budget = f"{b['tokens']:,}{trained}, {b['epochs']}" if b.get("tokens") else "?"
        cond = " | ".join("–" if c is None else f"{c:.3f}" for c in r["conditional"])
        print(f"| {r['head']} | {budget} | {cond} | {r['expected_accepted']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        cond = [c or 0.0 for c in r["conditional"]]
        xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(cond))]
        ax.bar(xs, cond, width, label=f"{r['head']} (E[accepted of 3] {r['expected_accepted']:.2f})")
    ax.set_xticks(range(len(rows[0]["conditional"])), ["1st", "2nd given 1st", "3rd given 2"][:len(rows[0]["conditional"])])
    ax.set(ylabel="greedy acceptance, held-out replies", ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
