"""Start-up of the main job: wall time from the `c2t-fast generate` command to its first generated token,
with no usable cache (the GGUF file de-quantised on every run, as before the cache existed), on a first
run (empty cache: converted and saved) and on later runs (the converted safetensors directory loaded).

    python benchmarks/startup.py [--runs 3] [--out benchmarks/results/startup.json]

Each run is a fresh process (imports included, as a user pays them). The first token is the first byte
the command writes to stdout: generate streams text as it is accepted and prints nothing before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def time_to_first_token(cache_dir: str, prompt: str) -> tuple[float, float]:
    """(seconds to the first stdout byte, seconds to exit) of one `c2t-fast generate` process."""
    env = {**os.environ, "C2T_FAST_CACHE": cache_dir, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "c2t_fast.cli", "generate", "--prompt", prompt, "--max-new-tokens", "8",
           "--no-baseline"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0 or not first:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return t_first, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="later runs to time (the median is reported)")
    ap.add_argument("--prompt", default="Name three primary colors.")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    # an unwritable cache: the model is converted from the GGUF file on every run, as before the cache
    uncached = time_to_first_token("/proc/c2t_fast_no_cache", args.prompt)
    with tempfile.TemporaryDirectory(prefix="c2t-startup-") as cache:
        first = time_to_first_token(cache, args.prompt)
        later = [time_to_first_token(cache, args.prompt) for _ in range(args.runs)]
    res = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "every_run_without_cache_s": {"first_token": round(uncached[0], 2), "exit": round(uncached[1], 2)},
           "first_run_s": {"first_token": round(first[0], 2), "exit": round(first[1], 2)},
           "later_runs_median_s": {"first_token": round(statistics.median(t for t, _ in later), 2),
                                   "exit": round(statistics.median(e for _, e in later), 2)},
           "later_runs_first_token_s": [round(t, 2) for t, _ in later]}
    print(json.dumps(res, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
