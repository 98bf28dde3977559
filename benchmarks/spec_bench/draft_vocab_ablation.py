"""The shipped head with its 8,192-id draft vocabulary vs the same head over the full 49,152-id LM head,
side by side in one process on the same prompts (greedy): draft and verify time per step, τ, γ and
tokens/s, with plain decoding of the same prompts timed in the same process.

    python benchmarks/spec_bench/draft_vocab_ablation.py --limit 2 --max-new-tokens 128 > ablation.md
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", default="../shared/data/spec_bench/mt_bench.jsonl")
    p.add_argument("--limit", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from c2t_fast.decoding.engine import Metrics, SpeculativeGenerator
    from c2t_fast.decoding.classifier import load_classifier
from c2t_fast.decoding.drafts.loading import load_draft
    from c2t_fast.hf.loading import load_target
    from c2t_fast.decoding.strategies import C2T, Eagle2

    target, tok = load_target("smollm2")
    drafts = {"8k draft vocabulary": load_draft(None, target), "full vocabulary": load_draft(None, target, True)}
    clf = load_classifier(None)
    settings = {"C2T β 0.5": lambda: C2T(clf, beta=0.5), "C2T β 0.6": lambda: C2T(clf, beta=0.6),
                "EAGLE-2 N 10": lambda: Eagle2(top_k=15, depth=9, total_tokens=10)}
    questions = [json.loads(line) for line in open(args.prompts)][:args.limit]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"][0] for q in questions]
    totals = {}
    ar_tokens = ar_time = 0.0
    for ids in prompts:
        for name, make in settings.items():
            for vocab, draft in drafts.items():
                gen = SpeculativeGenerator(target, draft, make(), eos_token_id=tok.eos_token_id)
                m = Metrics()
                n = sum(len(c) for c in gen.stream(ids, args.max_new_tokens, metrics=m))
                t = totals.setdefault((name, vocab), {"steps": 0, "acc": 0, "gamma": 0, "tokens": 0, "draft": 0.0,
                                                      "verify": 0.0, "time": 0.0})
                for k, v in (("steps", m.steps), ("acc", sum(m.accepted)), ("gamma", m.gamma), ("tokens", n),
                             ("draft", m.draft_time), ("verify", m.verify_time), ("time", m.total_time)):
                    t[k] += v
        start = time.perf_counter()
        gen.time_autoregressive(ids, args.max_new_tokens)
        ar_time += time.perf_counter() - start
        ar_tokens += args.max_new_tokens
    ar_rate = ar_tokens / ar_time
    print(f"{len(prompts)} prompts of {args.prompts}, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s); plain decoding {ar_rate:.2f} tokens/s\n")
    print("| setting | draft vocabulary | τ | γ/step | draft ms/step | verify ms/step | tokens/s | vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, vocab), t in totals.items():
        s = max(1, t["steps"])
        rate = t["tokens"] / t["time"]
        print(f"| {name} | {vocab} | {t['acc'] / s:.3f} | {t['gamma'] / s:.1f} | {1000 * t['draft'] / s:.0f} | "
              f"{1000 * t['verify'] / s:.0f} | {rate:.2f} | {rate / ar_rate:.2f}x |")


if __name__ == "__main__":
    main()
