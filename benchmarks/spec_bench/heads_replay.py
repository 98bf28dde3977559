"""Held-out first replies replayed through the engine with Chain(1), for each head: the engine's
first-token acceptance per step on the data set's own held-out prompts, next to what the training-side
measure (``benchmarks/heldout_acceptance.py``) reports for the same heads. Checks that a head's held-out
gain is not lost between training and the engine.

    python benchmarks/spec_bench/heads_replay.py --heads shipped=default,r1m=/path/to/head \
        --data experiments/results/selfdistill --jobs 8 --tokens 96
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from c2t_fast.decoding.drafts.loading import load_draft  # noqa: E402
from c2t_fast.decoding.engine import SpeculativeGenerator  # noqa: E402
from c2t_fast.decoding.strategies import Chain  # noqa: E402
from c2t_fast.hf.adapter import chat_stop_ids  # noqa: E402
from c2t_fast.hf.loading import load_target  # noqa: E402
from c2t_fast.training.selfdistill_train import SelfDistillData  # noqa: E402
from heads_ab import parse_heads  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", required=True, help="NAME=PATH,... (PATH 'default': the shipped head)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    args = ap.parse_args(argv)
    target, tok = load_target()
    data = SelfDistillData(args.data)
    gens = {k: SpeculativeGenerator(target, load_draft(p, target), Chain(1), stop_token_ids=chat_stop_ids(tok),
                                    ngram=None, budget=None) for k, p in parse_heads(args.heads).items()}
    tot = {k: [0, 0] for k in gens}
    refs = data.refs("heldout", limit=args.jobs)
    data.ensure_features(target, refs, False)
    for ref in refs:
        seq = data.load(ref)
        prompt = seq["ids"][:seq["loss_from"] + 1].view(1, -1)  # up to the first reply's start
        for k, g in gens.items():
            m = g.generate(prompt, args.tokens).metrics
            tot[k][0] += sum(m.accepted)
            tot[k][1] += m.steps
    print(json.dumps({k: {"accepted_per_step": a / s, "steps": s} for k, (a, s) in tot.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
