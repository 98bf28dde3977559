"""The speed table of BENCHMARKS.md from `speed.sh`'s output: one block per spec_bench set, every row of a
set timed in one process, with its ratio to plain decoding of the same (routed) target, to stock
generate() (torch's linear layers) and to transformers' prompt lookup.

    python benchmarks/spec_bench/speed_report.py runs/spec_bench_speed [> table.md]
"""

import json
import os
import sys

LABELS = {"ar": "plain decoding", "ar_stock": "stock generate() (torch linear)", "prompt_lookup": "prompt lookup (HF)"}


def label(row: dict) -> str:
    if row["strategy"] in LABELS:
        return LABELS[row["strategy"]]
    s = row["setting"] or {}
    return (f"{row['strategy']}, cost rule {'on' if s.get('budget') == 'auto' else 'off'}, "
            f"n-gram {'on' if s.get('ngram') else 'off'}")


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main(out: str) -> None:
    print("| set | row | τ | verified/step | plain steps | tokens/s | vs plain | vs stock | vs prompt lookup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "summary.json")
        if not os.path.isfile(path):
            continue
        rows = json.load(open(path))["rows"]
        base = {r["strategy"]: r["tokens_per_s"] for r in rows if r["strategy"] in LABELS}
        for r in rows:
            t = r["tokens_per_s"]
            ratios = [f"{t / base[k]:.2f}x" if k in base else "" for k in ("ar", "ar_stock", "prompt_lookup")]
            print(f"| {name} | {label(r)} | {fmt(r['tau'], '.3f')} | {fmt(r['gamma_per_step'], '.1f')} | "
                  f"{fmt(r.get('plain_share'), '.0%')} | {t:.2f} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
