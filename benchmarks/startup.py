"""Command to first token, a later run (model converted, cost profile cached): `c2t-fast generate --prompt
"Say hello." --max-new-tokens 8` timed end to end in fresh processes (median of ``--runs``), and one
in-process breakdown of the same work (imports, weights, tokenizer, draft, classifier, cost profile,
first token, the rest). Prints a table; ``--out`` writes startup.json.

    python benchmarks/startup.py [--runs 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CMD = ["generate", "--prompt", "Say hello.", "--max-new-tokens", "8", "--no-baseline"]

BREAKDOWN = r'''
import json, sys, time
t = [("start", time.perf_counter())]
def mark(name): t.append((name, time.perf_counter()))
import c2t_fast.cli  # what the command imports before it parses its arguments
mark("import c2t_fast")
from c2t_fast.hf.loading import load_target
from c2t_fast.hf import shipped
mark("import the loaders")
model, tok = load_target("smollm2")
mark("weights + tokenizer (load_target)")
from c2t_fast.hf.adapter import chat_stop_ids, encode_chat
ids = encode_chat(tok, "Say hello.")
mark("chat encoding")
from c2t_fast.decoding.drafts.loading import load_draft
draft = load_draft(None, model)
mark("draft head")
from c2t_fast.decoding.defaults import make_strategy
strategy = make_strategy()
mark("classifier + strategy")
from c2t_fast.decoding.engine import SpeculativeGenerator
gen = SpeculativeGenerator(model, draft, strategy, stop_token_ids=chat_stop_ids(tok))
mark("engine + cost profile")
it = gen.stream(ids, 8)
next(it)
mark("first token (prefill)")
for _ in it:
    pass
mark("7 more tokens")
tok.decode([1, 2, 3])
print(json.dumps([(a, round(tb - ta, 3)) for (_, ta), (a, tb) in zip(t, t[1:])]))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = [sys.executable, "-m", "c2t_fast.cli"]
    subprocess.run(exe + CMD, env=env, capture_output=True, check=True)  # the first run: converts, measures costs
    walls = []
    for _ in range(args.runs):
        t = time.perf_counter()
        subprocess.run(exe + CMD, env=env, capture_output=True, check=True)
        walls.append(time.perf_counter() - t)
    parts = json.loads(subprocess.run([sys.executable, "-c", BREAKDOWN], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    res = {"command": "c2t-fast " + " ".join(CMD), "runs_s": [round(w, 3) for w in walls],
           "median_s": round(statistics.median(walls), 3), "breakdown_s": parts}
    print(f"command to exit, later run: median {res['median_s']:.2f} s of {args.runs} ({res['runs_s']})")
    print("| step | seconds |\n|---|---:|")
    for name, s in parts:
        print(f"| {name} | {s:.3f} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "startup.json"), "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
