"""Draft heads side by side on spec_bench sets, one process so every row is timed in the same run: plain
decoding, transformers' prompt lookup, then for each head the main job's default (C2T with the shipped
classifier, the cost rule, n-gram branches) and a plain Chain(4) with no cost rule and no n-gram (its tau is
the head's own acceptance length). Rows of one prompt are interleaved, so drift of the machine's speed
falls on every row alike.

    python benchmarks/spec_bench/heads_ab.py --heads shipped=default,r1m=/path/to/head \
        --sets mt_bench,humaneval,alpaca,sum --limit 4 --tokens 128 --out experiments/results/heads_ab
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
from c2t_fast.decoding.drafts.loading import load_draft  # noqa: E402
from c2t_fast.decoding.strategies import Chain  # noqa: E402
from c2t_fast.hf.adapter import TargetAdapter, chat_stop_ids, encode_chat  # noqa: E402
from c2t_fast.hf.loading import load_target  # noqa: E402
from ratio_table import HEADER, ratio_lines  # noqa: E402

SPEC_BENCH = os.environ.get("SPEC_BENCH", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                                                        "spec_bench"))


def parse_heads(spec: str) -> dict[str, str | None]:
    out = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--heads: expected NAME=PATH (PATH 'default' for the shipped head), got {item!r}")
        out[name] = None if path == "default" else path
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", required=True, help="NAME=PATH,... (PATH 'default': the shipped head)")
    ap.add_argument("--sets", default="mt_bench,humaneval,alpaca,sum")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    heads = parse_heads(args.heads)
    os.makedirs(args.out, exist_ok=True)
    target, tok = load_target()
    adapter, stop = TargetAdapter(target), chat_stop_ids(tok)
    gens = {}
    for name, path in heads.items():
        head = load_draft(path, target)
        gens[f"{name} default"] = SpeculativeGenerator(target, head, stop_token_ids=stop)
        gens[f"{name} chain4"] = SpeculativeGenerator(target, head, Chain(4), stop_token_ids=stop, ngram=None,
                                                      budget=None)
    table = list(HEADER)
    results = {}
    for set_name in args.sets.split(","):
        prompts = [encode_chat(tok, t) for _, _, t in read_prompts(os.path.join(SPEC_BENCH, f"{set_name}.jsonl"),
                                                                   args.limit)]
        acc = {k: dict(n=0, t=0.0, steps=0, accepted=0, verified=0, plain=0)
               for k in ("plain", "prompt lookup", *gens)}
        for ids in prompts:
            for label, lookup in (("plain", 0), ("prompt lookup", PROMPT_LOOKUP_TOKENS)):
                t0 = time.perf_counter()
                acc[label]["n"] += adapter.generate(ids, args.tokens, stop_ids=stop, prompt_lookup_tokens=lookup).numel()
                acc[label]["t"] += time.perf_counter() - t0
            for label, gen in gens.items():
                m = gen.generate(ids, args.tokens).metrics
                a = acc[label]
                a["n"] += m.new_tokens
                a["t"] += m.total_time
                a["steps"] += m.steps
                a["accepted"] += sum(m.accepted)
                a["verified"] += m.gamma
                a["plain"] += m.plain_steps
        rows = {}
        for label, a in acc.items():
            r = {"tokens_per_s": a["n"] / a["t"]}
            if a["steps"]:
                r.update(tau=a["accepted"] / a["steps"], verified_per_step=a["verified"] / a["steps"],
                         plain_share=a["plain"] / a["steps"])
            rows[label] = r
        lines = ratio_lines(set_name, rows)
        table += lines
        results[set_name] = rows
        print("\n".join(lines), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"heads": heads, "limit": args.limit, "tokens": args.tokens, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
