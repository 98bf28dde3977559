"""WISCA experiment 4: the EAGLE draft head for SmolLM2 trained with and without WISCA on identical
data, initialisation and order; compared by held-out top-1 agreement and by acceptance length tau on
MT-bench (first turns, greedy, EAGLE-2 trees).

    python -m experiments.wisca.draft --out runs/wisca_draft --cache runs/draft/feature_cache --shards 8

``--cache`` is a feature cache written by ``c2t-fast train-draft`` (or ``cache_hidden_states``); the first
``--shards`` shards are used (32 sequences each). Without ``--cache`` one is built from ShareGPT with
``--token-budget``. The CPU default trains one epoch of a few hundred sequences, so WISCA runs at init
and every ``--every`` (20) optimizer steps rather than the paper's 250. The head has one attention layer
and GQA 9:3 (SmolLM2's widths). Resumable: finished configs are skipped; training resumes from its
checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch
from tqdm.auto import tqdm

from .common import load_done, save_run

SPEC_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "spec_bench",
                          "mt_bench.jsonl")


def subset_cache(cache: str, shards: int, out: str) -> str:
    files = sorted(glob.glob(os.path.join(cache, "shard_*.pt")))[:shards]
    if len(files) < shards:
        raise FileNotFoundError(f"{cache} has {len(files)} shards, --shards asks for {shards}")
    sub = os.path.join(out, "cache_subset")
    os.makedirs(sub, exist_ok=True)
    for f in files:
        link = os.path.join(sub, os.path.basename(f))
        if not os.path.exists(link):
            os.symlink(os.path.abspath(f), link)
    return sub


def measure_tau(target, tok, head, prompts: list[str], max_new_tokens: int) -> dict:
    from c2t_fast.decoding.engine import SpeculativeGenerator
    from c2t_fast.decoding.strategies import Eagle2

    gen = SpeculativeGenerator(target, head, Eagle2(), stop_token_ids=[tok.convert_tokens_to_ids("<|im_end|>")])
    steps = accepted = gamma = 0
    for text in tqdm(prompts, desc="tau on MT-bench", leave=False):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"][0]
        m = gen.generate(ids, max_new_tokens=max_new_tokens).metrics
        steps, accepted, gamma = steps + m.steps, accepted + sum(m.accepted), gamma + m.gamma
    return {"tau": accepted / max(steps, 1), "gamma": gamma, "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/wisca_draft")
    p.add_argument("--cache", default=None)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--token-budget", type=int, default=120_000)
    p.add_argument("--configs", default="baseline,wisca")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--every", type=int, default=20, help="WISCA every N optimizer steps (paper: 250)")
    p.add_argument("--prompts", type=int, default=8, help="MT-bench questions for tau")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mt-bench", default=SPEC_BENCH)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from c2t_fast.training.draft_head import DraftTrainConfig, cache_hidden_states, encode_conversations, train_draft
    from c2t_fast.decoding.drafts import EagleDraftHead
    from c2t_fast.hf.loading import load_target
    from wisca_fast import WiscaScheduler

    target, tok = load_target("smollm2")
    if args.cache:
        cache = subset_cache(args.cache, args.shards, args.out)
    else:
        from c2t_fast.training.sharegpt import sharegpt_conversations

        cache = os.path.join(args.out, "feature_cache")
        cache_hidden_states(target, encode_conversations(tok, sharegpt_conversations(), 512), cache, args.token_budget)
    with open(args.mt_bench) as f:
        prompts = [json.loads(line)["turns"][0] for line in f if line.strip()][: args.prompts]
    for config in args.configs.split(","):
        if config not in ("baseline", "wisca"):
            p.error(f"unknown config {config!r} (baseline, wisca)")
        if load_done(args.out, config, args.seed):
            print(f"{config}: done")
            continue

        def wisca_hook(head, opt, step):
            sched = WiscaScheduler(head, opt, every=args.every, at_init=step == 0)
            sched.steps = step
            return sched.step

        head_dir = os.path.join(args.out, config, "head")
        cfg = DraftTrainConfig(epochs=args.epochs, seed=args.seed)
        report = train_draft(target, cache, head_dir, cfg, step_hook=wisca_hook if config == "wisca" else None)
        head = EagleDraftHead.from_pretrained(head_dir, target)
        tau = measure_tau(target, tok, head, prompts, args.max_new_tokens)
        result = {"config": config, "seed": args.seed, "val_top1": report["validation"]["top1"],
                  "val_cls": report["validation"]["cls"], **tau, "train_tokens": report["tokens"],
                  "history": report["history"], "settings": vars(args)}
        save_run(args.out, config, args.seed, result)
        print(f"{config}: val top-1 {result['val_top1']:.4f}, tau {tau['tau']:.3f}")
    from .report import write_draft_report

    write_draft_report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
