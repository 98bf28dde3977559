"""Training-free draft sources ablated on spec_bench sets (issue #31), one process per set so every row is
timed side by side (rows interleaved per prompt): plain decoding, transformers' prompt lookup, the sources alone (no draft: n-gram,
datastore, recycling, all three) and the shipped head with them (the default main job, then with the
datastore and recycling too). Every speculative row runs the cost rule (budget auto).

    python benchmarks/spec_bench/sources.py --sets mt_bench,humaneval,alpaca,sum --limit 3 --tokens 128 \
        --out experiments/results/sources_ablation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from c2t_fast.bench import PROMPT_LOOKUP_TOKENS, read_prompts  # noqa: E402
from c2t_fast.decoding.engine import SpeculativeGenerator  # noqa: E402
from c2t_fast.decoding.defaults import load_sources  # noqa: E402
from c2t_fast.decoding.drafts.loading import load_draft  # noqa: E402
from c2t_fast.hf.adapter import TargetAdapter, chat_stop_ids, encode_chat  # noqa: E402
from c2t_fast.hf.loading import load_target  # noqa: E402
from ratio_table import HEADER, ratio_lines  # noqa: E402

SPEC_BENCH = os.environ.get("SPEC_BENCH", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                                                        "spec_bench"))
ROWS = [  # label, head?, n-gram tokens, datastore, recycling
    ("ngram", False, 10, None, False), ("datastore", False, 0, "default", False),
    ("recycling", False, 0, None, True), ("ngram+datastore+recycling", False, 10, "default", True),
    ("head+ngram (default)", True, 10, None, False), ("head+ngram+datastore+recycling", True, 10, "default", True),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="mt_bench,humaneval,alpaca,sum")
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare-datastore", default=None, metavar="DIR",
                    help="also run every datastore row with this datastore (rows marked '(DIR name)'), side by side")
    ap.add_argument("--rows", default=None,
                    help="comma-separated row labels to run (default: all); plain and prompt lookup always run")
    args = ap.parse_args(argv)
    rows_run = list(ROWS)
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {label for label, *_ in ROWS})
        if unknown:
            ap.error(f"--rows: unknown {unknown}; rows are {[label for label, *_ in ROWS]}")
        rows_run = [r for r in ROWS if r[0] in wanted]
    if args.compare_datastore:
        tag = os.path.basename(os.path.normpath(args.compare_datastore))
        rows_run += [(f"{label} ({tag})", h, n, args.compare_datastore, r) for label, h, n, ds, r in ROWS if ds]
    os.makedirs(args.out, exist_ok=True)
    target, tok = load_target()
    adapter, stop = TargetAdapter(target), chat_stop_ids(tok)
    head = load_draft(None, target)
    table = list(HEADER)
    results = {}
    for name in args.sets.split(","):
        prompts = [encode_chat(tok, t) for _, _, t in read_prompts(os.path.join(SPEC_BENCH, f"{name}.jsonl"), args.limit)]
        # rows interleaved per prompt: a drift of the machine's speed during the run lands on every row alike
        gens = {label: SpeculativeGenerator(target, head if use_head else None, stop_token_ids=stop, ngram=ngram,
                                            budget="auto", **load_sources(ds, rec, target))
                for label, use_head, ngram, ds, rec in rows_run}
        tally = {label: dict(n=0, t=0.0, steps=0, acc=0, verified=0, plain=0) for label in ["plain", "prompt lookup",
                                                                                           *gens]}
        for ids in prompts:
            for label, lookup in (("plain", 0), ("prompt lookup", PROMPT_LOOKUP_TOKENS)):
                t0 = time.perf_counter()
                tally[label]["n"] += adapter.generate(ids, args.tokens, stop_ids=stop,
                                                      prompt_lookup_tokens=lookup).numel()
                tally[label]["t"] += time.perf_counter() - t0
            for label, gen in gens.items():
                m, c = gen.generate(ids, args.tokens).metrics, tally[label]
                c["n"], c["t"], c["steps"] = c["n"] + m.new_tokens, c["t"] + m.total_time, c["steps"] + m.steps
                c["acc"], c["verified"], c["plain"] = c["acc"] + sum(m.accepted), c["verified"] + m.gamma, \
                    c["plain"] + m.plain_steps
        rows = {}
        for label, c in tally.items():
            rows[label] = {"tokens_per_s": c["n"] / c["t"]}
            if c["steps"]:
                rows[label].update(tau=c["acc"] / c["steps"], verified_per_step=c["verified"] / c["steps"],
                                   plain_share=c["plain"] / c["steps"])
        lines = ratio_lines(name, rows)
        table += lines
        results[name] = rows
        print("\n".join(lines), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"limit": args.limit, "tokens": args.tokens, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
