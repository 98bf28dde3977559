"""The self-distillation generator's speed against the machine's compute bound and the earlier
`distill-data`, measured side by side in one run (one process, nothing else running).

    python benchmarks/distill_throughput.py --out experiments/results/selfdistill_throughput [--seconds 150]

- bound: the target's batched prefill tokens/s (the best of transformers' forward on [4, 256] and the
  static-batch forward's single-sequence prefill of 512 tokens, median of 3 each);
- generator: ``generate_data`` with the shipped defaults on ShareGPT training conversations for
  ``--seconds`` (prefills of refilled slots included), reply tokens/s; once per ``--kv`` precision,
  and how many of the jobs both precisions finished came out token for token the same;
- distill-data: ``training.distill.distill`` (transformers' ``generate()`` in length-sorted batches of
  16, the settings of the shipped head's second run) on 32 first turns, reply tokens/s;
- agreement: the greedy 128-token replies to ``--agreement-jobs`` held-out first turns with the cache in
  fp32, fp16 and bf16: how many are token for token the fp32 cache's (the precision's cost in fidelity).
Writes ``throughput.json`` and prints a table. ``--only agreement`` runs that part alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2t_fast.hf.loading import load_target  # noqa: E402
from c2t_fast.hf.static_batch import StaticBatchLM  # noqa: E402
from c2t_fast.training.generator import GeneratorConfig  # noqa: E402
from c2t_fast.training.prompts import sharegpt_jobs  # noqa: E402
from c2t_fast.training.selfdistill import cpu_name, generate_data, stored_jobs  # noqa: E402


def prefill_bound(model) -> dict:
    ids = torch.randint(100, 40000, (4, 256))
    with torch.no_grad():
        model(ids)
        hf = []
        for _ in range(3):
            t = time.perf_counter()
            model(ids)
            hf.append(ids.numel() / (time.perf_counter() - t))
    lm = StaticBatchLM(model, 1, 1024)
    seq = torch.randint(100, 40000, (512,))
    ours = []
    for _ in range(4):
        lm.reset(0)
        t = time.perf_counter()
        lm.prefill(0, seq)
        ours.append(seq.numel() / (time.perf_counter() - t))
    return {"transformers_4x256": statistics.median(hf), "static_batch_1x512": statistics.median(ours[1:]),
            "bound": max(statistics.median(hf), statistics.median(ours[1:]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--kv", default="float32,float16")
    ap.add_argument("--first-job", type=int, default=3000, help="ShareGPT training job to start from")
    ap.add_argument("--distill-prompts", type=int, default=32)
    ap.add_argument("--agreement-jobs", type=int, default=56)
    ap.add_argument("--only", choices=("all", "agreement"), default="all")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, tok = load_target(fast_linear=False)
    res = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    res["kv_agreement"] = agreement(model, tok, args.agreement_jobs)
    print(f"KV precision agreement: {res['kv_agreement']}", flush=True)
    if args.only == "agreement":
        with open(os.path.join(args.out, "agreement.json"), "w") as f:
            json.dump(res, f, indent=2)
        return 0
    res["prefill"] = prefill_bound(model)
    print(f"prefill bound: {res['prefill']}", flush=True)
    _, train = sharegpt_jobs()
    jobs = train[args.first_job:args.first_job + 4000]
    gen = {}
    for kv in args.kv.split(","):
        with tempfile.TemporaryDirectory() as d:
            cfg = GeneratorConfig(kv_dtype=kv)
            meta = generate_data(model, tok, os.path.join(d, "data"), cfg, jobs=jobs, features_dir=os.path.join(d, "f"),
                                 time_limit_s=args.seconds, progress=False)
            s = meta["sessions"][-1]
            gen[kv] = {"reply_tokens_per_s": s["reply_tokens_per_s"], "seconds": s["seconds"], "jobs": meta["jobs"],
                       "linear": s["linear"], "slots": cfg.slots}
        print(f"generator kv={kv}: {gen[kv]}", flush=True)
    res["generator"] = gen
    from c2t_fast.training.distill import DistillConfig, distill
    from c2t_fast.kernels.skinny_linear import install_fast_linear

    with tempfile.TemporaryDirectory() as d:
        install_fast_linear(model)  # as `c2t-fast distill-data` ran (load_target routes by default)
        cfg = DistillConfig(start=3503, conversations=args.distill_prompts, batch_size=16, max_new_tokens=256,
                            sample_every=4, temperature=0.8, top_p=0.95, max_prompt_chars=1000, length_sort_batches=8)
        meta = distill(model, tok, d, cfg, progress=False)
        res["distill_data"] = {"reply_tokens_per_s": meta["tokens_per_s"], "seconds": meta["generate_s"],
                               "replies": meta["sequences"]}
    print(f"distill-data: {res['distill_data']}", flush=True)
    bound = res["prefill"]["bound"]
    lines = ["| what | tokens/s | vs prefill bound | vs distill-data |", "|---|---:|---:|---:|",
             f"| prefill bound (best of {res['prefill']['transformers_4x256']:.0f} / "
             f"{res['prefill']['static_batch_1x512']:.0f}) | {bound:.0f} | 1.00 | |"]
    old = res["distill_data"]["reply_tokens_per_s"]
    for kv, g in gen.items():
        r = g["reply_tokens_per_s"]
        lines.append(f"| generator, {g['slots']} slots, KV {kv} | {r:.0f} | {r / bound:.2f} | {r / old:.1f}x |")
    lines.append(f"| distill-data (generate(), batches of 16) | {old:.1f} | {old / bound:.2f} | 1.0x |")
    res["table"] = "\n".join(lines)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(res["table"])
    return 0


def agreement(model, tok, n: int) -> dict:
    """Greedy replies (128 tokens) to ``n`` held-out first turns with each cache precision: identical ones."""
    from c2t_fast.training.prompts import Job

    held, _ = sharegpt_jobs()
    jobs = [Job(j.kind, j.source_id, j.turns[:1], j.split) for j in held[:n]]
    replies = {}
    for kv in ("float32", "float16", "bfloat16"):
        with tempfile.TemporaryDirectory() as d:
            generate_data(model, tok, os.path.join(d, "x"), GeneratorConfig(slots=32, max_new_tokens=128, kv_dtype=kv,
                                                                             magpie_prompts=0),
                          jobs=jobs, capture=False, progress=False)
            replies[kv] = {r["job"]: r["tokens"].tolist() for r in stored_jobs(os.path.join(d, "x"), split=None)}
    ref = replies["float32"]
    out = {"jobs": len(ref)}
    for kv in ("float16", "bfloat16"):
        same = sum(replies[kv].get(j) == t for j, t in ref.items())
        out[kv] = {"identical_replies": same}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
