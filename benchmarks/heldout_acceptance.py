"""Held-out acceptance of any saved draft head (the shipped EAGLE-1 head too) on the self-distilled data
set's held-out jobs: the positions every scaling run of #28 is measured on, so heads of either kind and any
amount of training data sit in one table.

    python benchmarks/heldout_acceptance.py --draft default --data experiments/results/selfdistill \
        --out experiments/results/selfdistill_scaling/shipped_eagle1/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2t_fast.decoding.drafts.loading import load_draft  # noqa: E402
from c2t_fast.hf.loading import load_target  # noqa: E402
from c2t_fast.training.selfdistill_train import evaluate_head  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="default", help="a head directory, or 'default' for the shipped head")
    ap.add_argument("--data", required=True, help="the self-distilled data set directory")
    ap.add_argument("--features-dir", default=None)
    ap.add_argument("--heldout-jobs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True, help="report.json to write")
    args = ap.parse_args(argv)
    target, _ = load_target()
    head = load_draft(None if args.draft == "default" else args.draft, target)
    report = {"draft": args.draft, "kind": type(head).__name__, "heldout_jobs": args.heldout_jobs,
              "heldout": evaluate_head(target, head, args.data, args.features_dir, args.heldout_jobs, args.steps)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report["heldout"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
