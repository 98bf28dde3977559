"""Shared pieces of the WISCA experiment scripts: run bookkeeping (one JSON per run, skip when done),
checkpoints for resuming inside a run, and mean/spread summaries."""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch
from tqdm.auto import tqdm


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


def parse_run_args(p, argv, known: dict):
    """Parse, apply ``--threads``, and check ``--configs`` against ``known``; returns (args, configs)."""
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in known]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(known)}")
    return args, configs


def run_grid(out: str, configs: list[str], seeds: list[int], train, metric: str) -> None:
    """Train every (config, seed) not yet done, seed-major (every config gets a first seed before any
    gets a second); ``train(config, seed)`` returns the result JSON, which holds ``metric``."""
    for seed in seeds:
        for config in configs:
            done = load_done(out, config, seed)
            if done:
                print(f"{config} seed {seed}: done ({metric} {done[metric]:.4f})")
                continue
            result = train(config, seed)
            save_run(out, config, seed, result)
            print(f"{config} seed {seed}: train loss {result['final_train_loss']:.4f}, {metric} {result[metric]:.4f}"
                  f" ({result['seconds']:.0f} s)")


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


@torch.no_grad()
def mean_lm_loss(model, blocks: torch.Tensor, batch: int) -> float:
    """Token-mean next-token CE of ``model`` over ``blocks`` [N, L + 1] (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, blocks.shape[0], batch):
        x = blocks[i:i + batch]
        logits = model(input_ids=x[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(),
                                                   reduction="sum").item()
        n += x[:, 1:].numel()
    model.train(was_training)
    return total / n


def train_loop(model, opt, params, blocks: torch.Tensor, order: torch.Tensor, evaluate, sched, args, ckpt: str,
               desc: str, checkpoint_weights=None, eval_at_start: bool = False) -> dict:
    """The experiments' shared LM training loop, resumable from ``ckpt``.

    Next-token CE on ``blocks[order]`` batches, cosine LR with warm-up, gradient clipping at 1.0, the
    WISCA scheduler stepped after every optimizer step (its transitions recorded), ``evaluate()`` every
    ``args.eval_every`` steps and at the end, checkpoints every ``args.ckpt_every`` steps
    (``checkpoint_weights()`` picks the weights to store; default: all). Returns the run state:
    step, history (train losses), evals [(step, loss)], transitions [(step, factor summary)], elapsed."""
    state = {"step": 0, "history": [], "evals": [], "transitions": [], "elapsed": 0.0}
    if os.path.isfile(ckpt):
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        if sched:
            sched.steps = state["step"]
    else:
        if sched and sched.history:
            state["transitions"].append(sched.history[-1])  # the transition at init
        if eval_at_start:
            state["evals"].append((0, evaluate()))
    model.train()
    bar = tqdm(total=args.steps, initial=state["step"], desc=desc, leave=False)
    t0 = time.perf_counter() - state["elapsed"]
    while state["step"] < args.steps:
        step = state["step"]
        x = blocks[order[(step * args.batch) % order.numel():][: args.batch]]
        for g in opt.param_groups:  # groups with their own base LR (per-matrix LR runs) keep its ratio
            g["lr"] = g.get("base_lr", args.lr) * cosine_lr(step, args.steps, args.warmup)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["history"].append(loss.item())
        if sched and sched.step() is not None:
            state["transitions"].append(sched.history[-1])
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            state["evals"].append((state["step"], evaluate()))
            model.train()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if state["step"] % args.ckpt_every == 0 and state["step"] < args.steps:
            state["elapsed"] = time.perf_counter() - t0
            weights = checkpoint_weights() if checkpoint_weights else model.state_dict()
            torch.save({"model": weights, "opt": opt.state_dict(), "state": state}, ckpt)
    bar.close()
    state["elapsed"] = time.perf_counter() - t0
    if os.path.isfile(ckpt):
        os.remove(ckpt)
    return state
