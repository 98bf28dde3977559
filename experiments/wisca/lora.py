"""WISCA experiment 3: LoRA fine-tuning of SmolLM2-135M-Instruct (peft) on ShareGPT conversations,
baseline vs WISCA with both LoRA options ("effective": factors pushed into the frozen base and B;
"adapter": each adapter's A/B balanced), several seeds, identical adapter init and data order per seed.

    python -m experiments.wisca.lora --out runs/wisca_lora
    python -m experiments.wisca.lora --steps 1000 --batch 16 --seq-len 512 --every 250   # bigger hardware

The CPU default is short (30 steps), so WISCA runs at init and every 10 steps instead of the paper's
250 (a run of 30 steps would otherwise never see a transition after init). Conversations come from the
end of the ShareGPT file (disjoint from the draft head's); the validation conversations are disjoint
from the training ones. Resumable per run (JSON per finished run; checkpoints inside a run).
"""

from __future__ import annotations

import argparse
import copy
import os
from itertools import islice

import torch

from .common import mean_lm_loss, parse_run_args, run_grid, train_loop

CONFIGS = {"baseline": None, "wisca_effective": "effective", "wisca_adapter": "adapter"}


def conversation_blocks(tokenizer, first: int, count: int, seq_len: int) -> torch.Tensor:
    """Chat-template token ids of ``count`` ShareGPT conversations starting at ``first``, as
    ``[count', seq_len + 1]`` blocks (conversations shorter than a block are skipped)."""
    from c2t_fast.training.sharegpt import sharegpt_conversations

    out = []
    for msgs in islice(sharegpt_conversations(), first, first + count):
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) > seq_len:
            out.append(torch.tensor(ids[: seq_len + 1]))
    return torch.stack(out)


def lora_model(seed: int, rank: int):
    from peft import LoraConfig, get_peft_model

    from c2t_fast.hf.shipped import load_smollm2

    base, _ = load_smollm2()
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(copy.deepcopy(base), cfg)


def train_one(args, train: torch.Tensor, val: torch.Tensor, config: str, seed: int) -> dict:
    from wisca_fast import WiscaScheduler

    model = lora_model(seed, args.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    mode = CONFIGS[config]
    sched = WiscaScheduler(model, opt, every=args.every, lora=mode) if mode else None
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    os.makedirs(os.path.join(args.out, config), exist_ok=True)
    ckpt = os.path.join(args.out, config, f"seed{seed}.ckpt.pt")
    # effective-mode WISCA also rescales the frozen base: then the whole model travels with a checkpoint
    adapters = None if mode == "effective" else (lambda: {k: v for k, v in model.state_dict().items()
                                                          if "lora_" in k})
    state = train_loop(model, opt, params, train, order, lambda: mean_lm_loss(model, val, args.batch), sched, args,
                       ckpt, f"{config} seed {seed}", checkpoint_weights=adapters, eval_at_start=True)
    tail = state["history"][-args.tail:]
    result = {"config": config, "seed": seed, "final_train_loss": sum(tail) / len(tail),
              "val_loss": state["evals"][-1][1], "history": state["history"], "evals": state["evals"],
              "transitions": state["transitions"], "seconds": state["elapsed"], "settings": vars(args)}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/wisca_lora")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--every", type=int, default=10, help="WISCA every N optimizer steps (paper: 250)")
    p.add_argument("--train-conversations", type=int, default=600)
    p.add_argument("--val-conversations", type=int, default=40)
    p.add_argument("--first-conversation", type=int, default=9000)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--tail", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    args, configs = parse_run_args(p, argv, CONFIGS)
    from c2t_fast.hf.shipped import load_smollm2

    _, tok = load_smollm2()
    train = conversation_blocks(tok, args.first_conversation, args.train_conversations, args.seq_len)
    val = conversation_blocks(tok, args.first_conversation + args.train_conversations, args.val_conversations,
                              args.seq_len)
    print(f"LoRA data: {train.shape[0]} train blocks, {val.shape[0]} validation blocks of {args.seq_len + 1} tokens")
    run_grid(args.out, configs, [int(s) for s in args.seeds.split(",")],
             lambda config, seed: train_one(args, train, val, config, seed), "val_loss")
    from .report import write_lora_report

    write_lora_report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
