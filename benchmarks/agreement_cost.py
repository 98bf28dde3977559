"""What agreeing across tensor-parallel ranks costs a decoding step: the engine takes two agreement points
per step (rank 0's drafting time and step time, ``RankAgreement.share``), each one all-gather of 9 float64
values. Timed here on ``--world`` gloo processes (one thread each) over ``--calls`` calls; the median and
p90 of one call and the per-step cost (two calls) are printed and written as JSON.

    python benchmarks/agreement_cost.py --world 2 --calls 2000 --out experiments/results/agreement_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(rank: int, world: int, port: int, calls: int, queue) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from c2t_fast.decoding.agreement import RankAgreement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    agree = RankAgreement()
    for _ in range(50):  # warm-up: connections and buffers
        agree.share([0.01])
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        agree.share([0.001 * i])
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args.calls, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    times = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    us = sorted(t * 1e6 for t in times)
    report = {"world": args.world, "backend": "gloo", "calls": args.calls, "median_us": statistics.median(us),
              "p90_us": us[int(0.9 * len(us))], "per_step_us": 2 * statistics.median(us),
              "cpu": _cpu()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
