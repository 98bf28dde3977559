"""WISCA experiment 1+2: pre-train a small GQA Llama from scratch on Wikipedia summaries + ShareGPT
text, baseline vs WISCA (and ablations), several seeds, identical initialisation and data order per seed.

    python -m experiments.wisca.pretrain --out runs/wisca_pretrain            # the defaults below
    python -m experiments.wisca.pretrain --configs baseline,wisca --seeds 0,1,2 --steps 600
    python -m experiments.wisca.pretrain --hidden 512 --layers 8 --vocab 0 --steps 5000   # bigger hardware

Every (config, seed) writes ``OUT/CONFIG/seedN.json`` when done (reruns skip it) and checkpoints inside
the run every ``--ckpt-every`` steps (a killed run resumes there). ``summary.json``, ``summary.md`` and
``loss_curves.png`` are rebuilt from the finished runs at the end.
"""

from __future__ import annotations

import argparse
import os

import torch

from .common import mean_lm_loss, parse_run_args, run_grid, train_loop
from .corpus import build_corpus

# name -> (group size override or None, WiscaScheduler kwargs or None for no WISCA)
CONFIGS = {
    "baseline": (None, None),
    "wisca": (None, dict(every=250)),
    "qk_only": (None, dict(every=250, vo=False)),
    "vo_only": (None, dict(every=250, qk=False)),
    "channel_qk": (None, dict(every=250, vo=False, granularity="channel")),
    "init_only": (None, dict(every=0)),
    "keep_state": (None, dict(every=250, optimizer_state="keep")),
    "mha_baseline": (1, None),
    "mha_wisca": (1, dict(every=250)),
}


def make_model(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 + 63) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=seq_len, tie_word_embeddings=True, rope_theta=10000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


evaluate = mean_lm_loss  # module attribute: the resume test interrupts a run through it


def train_one(args, corpus: dict, config: str, seed: int, out: str) -> dict:
    from wisca_fast import WiscaScheduler

    group, wisca = CONFIGS[config]
    if wisca and wisca["every"]:
        wisca = {**wisca, "every": args.every}
    kv_heads = args.heads // (group or args.group)
    model = make_model(corpus["vocab"], args.hidden, args.layers, args.heads, kv_heads, args.seq_len, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sched = WiscaScheduler(model, opt, **wisca) if wisca else None  # at init: before any step
    order = torch.randperm(corpus["train"].shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    val = corpus["val"][: args.val_blocks]
    os.makedirs(os.path.join(out, config), exist_ok=True)
    ckpt = os.path.join(out, config, f"seed{seed}.ckpt.pt")
    state = train_loop(model, opt, list(model.parameters()), corpus["train"], order,
                       lambda: evaluate(model, val, args.batch), sched, args, ckpt, f"{config} seed {seed}")
    tail = state["history"][-args.tail:]
    result = {"config": config, "seed": seed, "group": group or args.group,
              "params": sum(p.numel() for p in model.parameters()),
              "final_train_loss": sum(tail) / len(tail), "val_loss": state["evals"][-1][1],
              "val_ppl": float(torch.tensor(state["evals"][-1][1]).exp()),
              "history": state["history"], "evals": state["evals"], "transitions": state["transitions"],
              "seconds": state["elapsed"], "settings": vars(args)}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/wisca_pretrain")
    p.add_argument("--configs", default="baseline,wisca", help=f"comma-separated, from {','.join(CONFIGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head (GQA group size)")
    p.add_argument("--vocab", type=int, default=16384, help="compacted vocabulary size; 0 = SmolLM2's full one")
    p.add_argument("--sharegpt", type=int, default=2000, help="ShareGPT conversations added to the Wikipedia text")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--every", type=int, default=250, help="WISCA every N optimizer steps (init_only: never)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-blocks", type=int, default=256)
    p.add_argument("--tail", type=int, default=50, help="final train loss = mean of the last N steps")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args, configs = parse_run_args(p, argv, CONFIGS)
    if args.heads % args.group:
        p.error(f"--heads {args.heads} is not divisible by --group {args.group}")
    corpus = build_corpus(os.path.join(args.out, "cache"), args.seq_len, args.vocab, args.sharegpt)
    print("corpus:", corpus["stats"])
    run_grid(args.out, configs, [int(s) for s in args.seeds.split(",")],
             lambda config, seed: train_one(args, corpus, config, seed, args.out), "val_ppl")
    from .report import write_pretrain_report

    write_pretrain_report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
