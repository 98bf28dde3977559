"""Datastore lookup per decoding step (issue #31's <= 50 us target): ``Datastore.lookup`` on contexts cut
from held-out replies of the self-distilled data set (never in the datastore), the way the engine calls it
(the last 12 tokens, a tree of up to 16 nodes, 6 levels). Prints the median, p90 and hit rate.

    python benchmarks/datastore_lookup.py --datastore DIR --data experiments/results/selfdistill --calls 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2t_fast.decoding.drafts.datastore import load_datastore  # noqa: E402
from c2t_fast.training.selfdistill import stored_jobs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datastore", default=None, help="a datastore directory (default: the shipped one)")
    ap.add_argument("--data", required=True, help="a self-distilled data set: contexts from its held-out replies")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ds = load_datastore(args.datastore)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    replies = []
    for row in stored_jobs(args.data, split="heldout"):
        seq = row["tokens"].numpy()
        replies += [seq[a:b] for a, b, _ in row["replies"] if b - a > 16]
    times, hits = [], 0
    for _ in range(args.calls):
        r = replies[rng.integers(len(replies))]
        end = int(rng.integers(12, r.size))
        ctx = r[end - 12:end].tolist()
        t = time.perf_counter()
        out = ds.lookup(ctx, depth=6, max_nodes=16)
        times.append(time.perf_counter() - t)
        hits += out is not None
    us = sorted(x * 1e6 for x in times)
    report = {"datastore_tokens": len(ds), "load_s": load_s, "calls": args.calls, "median_us": statistics.median(us),
              "p90_us": us[int(0.9 * len(us))], "hit_rate": hits / args.calls}
    print(json.dumps(report))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
