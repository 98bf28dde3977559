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
import os
import time

import torch
from tqdm.auto import tqdm

from .common import cosine_lr, load_done, save_run

CONFIGS = {"baseline": None, "wisca_effective": "effective", "wisca_adapter": "adapter"}


def conversation_blocks(tokenizer, first: int, count: int, seq_len: int) -> torch.Tensor:
    """Chat-template token ids of ``count`` ShareGPT conversations starting at ``first``, as
    ``[count', seq_len + 1]`` blocks (conversations shorter than a block are skipped)."""
    from c2t_fast.data import sharegpt_conversations

    out = []
    for i, msgs in enumerate(sharegpt_conversations()):
        if i < first:
            continue
        if i >= first + count:
            break
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) > seq_len:
            out.append(torch.tensor(ids[: seq_len + 1]))
    return torch.stack(out)


def lora_model(seed: int, rank: int):
    from peft import LoraConfig, get_peft_model

    from c2t_fast.shipped import load_smollm2

    base, _ = load_smollm2()
    import copy

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(copy.deepcopy(base), cfg)


@torch.no_grad()
def val_loss(model, val: torch.Tensor, batch: int) -> float:
    model.eval()
    total = n = 0
    for i in range(0, val.shape[0], batch):
        x = val[i:i + batch]
        logits = model(input_ids=x[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    model.train()
    return total / n


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
    state = {"step": 0, "history": [], "evals": [], "elapsed": 0.0}
    if os.path.isfile(ckpt):
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        if sched:
            sched.steps = state["step"]
    else:
        state["evals"].append((0, val_loss(model, val, args.batch)))
    model.train()
    t0 = time.perf_counter() - state["elapsed"]
    bar = tqdm(total=args.steps, initial=state["step"], desc=f"{config} seed {seed}", leave=False)
    while state["step"] < args.steps:
        step = state["step"]
        idx = order[(step * args.batch) % order.numel():][: args.batch]
        x = train[idx]
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, args.steps, args.warmup)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["history"].append(loss.item())
        if sched:
            sched.step()
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            state["evals"].append((state["step"], val_loss(model, val, args.batch)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if state["step"] % args.ckpt_every == 0 and state["step"] < args.steps:
            state["elapsed"] = time.perf_counter() - t0
            trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k}
            # effective-mode WISCA also rescales the frozen base: it must travel with the checkpoint
            if mode == "effective":
                trainable = model.state_dict()
            torch.save({"model": trainable, "opt": opt.state_dict(), "state": state}, ckpt)
    bar.close()
    tail = state["history"][-args.tail:]
    result = {"config": config, "seed": seed, "final_train_loss": sum(tail) / len(tail),
              "val_loss": state["evals"][-1][1], "history": state["history"], "evals": state["evals"],
              "transitions": [s for s, _ in sched.history] if sched else [],
              "seconds": time.perf_counter() - t0, "settings": vars(args)}
    if os.path.isfile(ckpt):
        os.remove(ckpt)
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    from c2t_fast.shipped import load_smollm2

    _, tok = load_smollm2()
    train = conversation_blocks(tok, args.first_conversation, args.train_conversations, args.seq_len)
    val = conversation_blocks(tok, args.first_conversation + args.train_conversations, args.val_conversations,
                              args.seq_len)
    print(f"LoRA data: {train.shape[0]} train blocks, {val.shape[0]} validation blocks of {args.seq_len + 1} tokens")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for config in configs:
            done = load_done(args.out, config, seed)
            if done:
                print(f"{config} seed {seed}: done (val loss {done['val_loss']:.4f})")
                continue
            result = train_one(args, train, val, config, seed)
            save_run(args.out, config, seed, result)
            print(f"{config} seed {seed}: train loss {result['final_train_loss']:.4f}, val loss {result['val_loss']:.4f}"
                  f" ({result['seconds']:.0f} s)")
    from .report import write_lora_report

    write_lora_report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
