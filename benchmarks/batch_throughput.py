"""Throughput at batch sizes B (issue #32): stock batched ``generate()`` (left padding, greedy) against the batched
speculative engine (``decoding.batch``, a tree per sequence, every tree verified in one pass) with the main job's
drafting (the shipped head, n-gram, datastore and recycling branches) and with the training-free sources alone.

The same prompts (spread over the spec_bench sets) run at every B, cut into batches of B, every row of a batch
timed side by side (interleaved per batch), so every B does the same work. Total new tokens / total seconds.
Every speculative row is also compared with stock generate's row (identical token ids or not).

    python benchmarks/batch_throughput.py --batches 1,2,4,8 --prompts 8 --tokens 64 \
        --out experiments/results/batch_throughput
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2t_fast.bench import read_prompts  # noqa: E402
from c2t_fast.decoding.batch import BatchSpeculativeGenerator  # noqa: E402
from c2t_fast.decoding.drafts.loading import load_draft  # noqa: E402
from c2t_fast.hf.adapter import chat_stop_ids, encode_chat, generate_batch  # noqa: E402
from c2t_fast.hf.loading import load_target  # noqa: E402

SPEC_BENCH = os.environ.get("SPEC_BENCH", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                        "spec_bench"))


def _prompts(tok, sets: list, n: int) -> list[torch.Tensor]:
    per_set = [[encode_chat(tok, t) for _, _, t in read_prompts(os.path.join(SPEC_BENCH, f"{s}.jsonl"), n)]
               for s in sets]
    out = []
    for i in range(n):  # round robin over the sets: every batch mixes kinds of text
        out.append(per_set[i % len(sets)][i // len(sets)])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--sets", default="mt_bench,humaneval,alpaca",
                    help="spec_bench sets the prompts come from (Sum's long articles make a run mostly prefill)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-nodes", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sizes = [int(b) for b in args.batches.split(",")]
    target, tok = load_target()
    stop = chat_stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    head = load_draft(None, target)
    prompts = _prompts(tok, args.sets.split(","), args.prompts)
    rows = {"stock generate": None,
            "speculative (default drafting)": BatchSpeculativeGenerator(target, head, stop_token_ids=stop,
                                                                        max_nodes=args.max_nodes),
            "speculative (sources alone)": BatchSpeculativeGenerator(target, None, stop_token_ids=stop,
                                                                     max_nodes=args.max_nodes)}
    results = {}
    for B in sizes:
        tally = {label: dict(tokens=0, seconds=0.0, same_rows=0, rows=0, tau=[], passes=0) for label in rows}
        for start in range(0, len(prompts), B):
            chunk = prompts[start:start + B]
            t0 = time.perf_counter()
            stock = generate_batch(target, chunk, args.tokens, pad, stop)
            c = tally["stock generate"]
            c["seconds"] += time.perf_counter() - t0
            c["tokens"] += sum(s.numel() for s in stock)
            for label, gen in rows.items():
                if gen is None:
                    continue
                out = gen.generate([p.tolist() for p in chunk], max_new_tokens=args.tokens)
                c = tally[label]
                c["seconds"] += out.metrics.total_time
                c["tokens"] += out.metrics.new_tokens
                c["passes"] += out.passes
                c["tau"] += out.metrics.accepted
                c["rows"] += len(chunk)
                c["same_rows"] += sum(a == s.tolist() for a, s in zip(out.tokens, stock))
        results[B] = {}
        for label, c in tally.items():
            r = {"tokens": c["tokens"], "seconds": round(c["seconds"], 3),
                 "tokens_per_s": round(c["tokens"] / c["seconds"], 2)}
            if c["rows"]:
                r.update(tau=round(sum(c["tau"]) / max(1, len(c["tau"])), 3), passes=c["passes"],
                         rows_equal_to_stock=f"{c['same_rows']}/{c['rows']}")
            results[B][label] = r
        base = results[B]["stock generate"]["tokens_per_s"]
        for label, r in results[B].items():
            r["vs_stock"] = round(r["tokens_per_s"] / base, 3)
            print(f"B={B} {label}: {r}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"prompts": args.prompts, "sets": args.sets, "tokens": args.tokens, "max_nodes": args.max_nodes, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    lines = ["| B | " + " | ".join(f"{label} tok/s (x stock)" for label in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for B, res in results.items():
        lines.append(f"| {B} | " + " | ".join(f"{res[label]['tokens_per_s']} ({res[label]['vs_stock']}x)"
                                             for label in rows) + " |")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label in rows:
            ax.plot(sizes, [results[B][label]["tokens_per_s"] for B in sizes], marker="o", label=label)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("new tokens / s (all rows)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "throughput.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
