"""Shared pieces of the WISCA experiment scripts: run bookkeeping (one JSON per run, skip when done),
checkpoints for resuming inside a run, and mean/spread summaries."""

from __future__ import annotations

import json
import math
import os
import statistics


def run_path(out: str, config: str, seed: int) -> str:
    return os.path.join(out, config, f"seed{seed}.json")


def load_done(out: str, config: str, seed: int) -> dict | None:
    path = run_path(out, config, seed)
    return json.load(open(path)) if os.path.isfile(path) else None


def save_run(out: str, config: str, seed: int, result: dict) -> None:
    path = run_path(out, config, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def mean_spread(values: list[float]) -> dict:
    """Mean, sample std, min, max of per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def compare(base: dict, other: dict) -> dict:
    """Difference of means (other - base), relative, and whether it exceeds the seed spread: the gap
    must be larger than the sum of the two sample standard deviations (a deliberately plain rule)."""
    diff = other["mean"] - base["mean"]
    return {"diff": diff, "rel": diff / base["mean"] if base["mean"] else math.nan,
            "exceeds_spread": abs(diff) > base["std"] + other["std"] and base["n"] > 1 and other["n"] > 1}


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
