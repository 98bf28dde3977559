"""One side of an A/B timing of the engine's step: the same prompts, strategies and tokens in each
checkout; prints one JSON line (median ms per step after prefill, tau).

Usage (alternate the two sides in fresh processes on an idle machine):
    git worktree add /tmp/before <commit>; cp c2t_fast/_C*.so /tmp/before/c2t_fast/   (+ wisca_fast)
    for i in 1 2; do PYTHONPATH=/tmp/before python benchmarks/engine_step_ab.py
                     PYTHONPATH=$PWD python benchmarks/engine_step_ab.py; done
Works with the layouts before #14 (c2t_fast.engine, ...), after it (c2t_fast.decoding.engine, ...) and after #30
(c2t_fast.decoding.drafts, ...).
"""
import json
import os
import statistics

import c2t_fast

MT_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "spec_bench",
                        "mt_bench.jsonl")
_root = os.path.dirname(c2t_fast.__file__)
if os.path.isdir(os.path.join(_root, "decoding", "drafts")):  # the second layout step (#30)
    from c2t_fast.hf.loading import load_target
    from c2t_fast.decoding.classifier import load_classifier
    from c2t_fast.decoding.drafts.loading import load_draft
    from c2t_fast.decoding.strategies import C2T, Chain
    from c2t_fast.decoding.engine import SpeculativeGenerator
    side = "after"
elif os.path.isdir(os.path.join(_root, "hf")):  # the first layout step (#14)
    from c2t_fast.hf.loading import load_target
    from c2t_fast.decoding.loading import load_classifier, load_draft
    from c2t_fast.decoding.strategies import C2T, Chain
    from c2t_fast.decoding.engine import SpeculativeGenerator
    side = "before"
else:
    from c2t_fast.loading import load_target, load_draft, load_classifier
    from c2t_fast.strategies import C2T, Chain
    from c2t_fast.engine import SpeculativeGenerator
    side = "before-#14"
target, tok = load_target("smollm2")
draft = load_draft(None, target)
prompts = [json.loads(line)["turns"][0] for line in open(MT_BENCH)][:2]
ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt",
                               return_dict=True)["input_ids"][0] for p in prompts]
out = {"side": side, "file": c2t_fast.__file__}
for name, strat in (("chain", Chain(4)), ("c2t", C2T(load_classifier(None)))):
    gen = SpeculativeGenerator(target, draft, strat, eos_token_id=[], budget=None, ngram=None)
    gen.generate(ids[0], max_new_tokens=8)  # warm-up
    per_step = []
    for _ in range(2):
        for x in ids:
            r = gen.generate(x, max_new_tokens=48)
            per_step.append((r.metrics.total_time - r.metrics.prefill_time) / max(1, r.metrics.steps))
    out[name] = {"step_ms_median": round(1e3 * statistics.median(per_step), 2), "tau": r.metrics.tau}
print(json.dumps(out))
