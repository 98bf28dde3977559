"""Self-distilled training text for a draft head: the target's own replies to ShareGPT first turns (never
a spec_bench prompt), greedy plus a share sampled at a temperature, generated in batches and stored as
token ids. A draft trained on the target's own text learns what the target says (Medusa-2's
self-distillation), which matters when the target's answers differ from ShareGPT's.

Directory layout (append-only, resumable: a rerun continues after the last whole batch):

- ``tokens.bin``: every sequence's chat-formatted token ids (prompt, then reply), concatenated, as
  little-endian ``uint16`` when the vocabulary fits, else ``int32`` (``meta.json["dtype"]``);
- ``index.jsonl``: one line per sequence: ``offset``, ``length``, ``prompt_len``, ``sampled`` (bool),
  ``prompt`` (its rank among the first turns used, from ``start``; turns over ``max_prompt_chars`` are
  skipped, so it is not the conversation number);
- ``meta.json``: the settings, ``sequences``, ``tokens`` (reply tokens generated), ``conversations_used``,
  ``generate_s`` and ``tokens_per_s`` of the generation so far.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from ..hf.adapter import chat_stop_ids, encode_chat, generate_batch
from .feature_store import write_json


@dataclass
class DistillConfig:
    start: int = 3000  # first ShareGPT conversation: clear of the shipped head's (0-2,200) and classifier's (7,000+)
    conversations: int = 1000  # first turns to answer
    batch_size: int = 8
    max_new_tokens: int = 256
    sample_every: int = 4  # every n-th batch is sampled (the rest greedy); 0: all greedy
    temperature: float = 0.8
    top_p: float = 0.95
    max_prompt_chars: int = 2000
    seed: int = 0
    # prompts are answered in groups of this many batches sorted by token length, so a batch pads its
    # prompts to similar lengths (0: in ShareGPT order; padding a batch of 16 to one long prompt made the
    # prefill most of the batch's time)
    length_sort_batches: int = 0

    def validate(self) -> None:
        for name in ("conversations", "batch_size", "max_new_tokens", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.length_sort_batches < 0:
            raise ValueError(f"DistillConfig.length_sort_batches must be >= 0, got {self.length_sort_batches}")
        if self.start < 0 or self.sample_every < 0 or not 0 < self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise ValueError("DistillConfig: start and sample_every >= 0, temperature in (0, 2], top_p in (0, 1]")


def distill(target, tokenizer, out_dir: str, config: DistillConfig | None = None, prompts: list[str] | None = None,
            progress: bool = True) -> dict:
    """Generate (or continue generating) the target's replies into ``out_dir``; returns the meta.
    ``prompts``: first turns to use instead of ShareGPT's (tests)."""
    from tqdm.auto import tqdm

    cfg = config or DistillConfig()
    cfg.validate()
    os.makedirs(out_dir, exist_ok=True)
    meta_file = os.path.join(out_dir, "meta.json")
    vocab = len(tokenizer)
    dtype = "<u2" if vocab <= 1 << 16 else "<i4"
    meta = {"format": "c2t-distilled", "version": 1, "dtype": dtype, "config": asdict(cfg), "sequences": 0,
            "tokens": 0, "conversations_used": 0, "generate_s": 0.0}
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            old = json.load(f)
        # a run from before length sorting existed answered in ShareGPT order
        if {"length_sort_batches": 0, **old.get("config", {})} != asdict(cfg) or old.get("dtype") != dtype:
            raise ValueError(f"{out_dir} holds a run with other settings ({old.get('config')}); use a new directory")
        meta = old
    if prompts is None:
        from .sharegpt import first_turns

        prompts = first_turns(cfg.start, cfg.conversations, cfg.max_prompt_chars)
    prompts = prompts[:cfg.conversations]
    encoded = [encode_chat(tokenizer, p) for p in prompts]  # once: the order needs the lengths, the batches the ids
    order = answer_order([len(e) for e in encoded], cfg.batch_size * cfg.length_sort_batches)
    stop = chat_stop_ids(tokenizer) or [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    done = meta["conversations_used"]
    bar = tqdm(total=len(prompts), initial=done, desc="distilling the target's replies", disable=not progress)
    # The files are cut back to the last recorded batch first: a batch interrupted mid-write is redone.
    tokens_file, index_file = os.path.join(out_dir, "tokens.bin"), os.path.join(out_dir, "index.jsonl")
    width = np.dtype(dtype).itemsize
    offset = _recorded_tokens(index_file, meta["sequences"])  # read once; kept current below
    with open(tokens_file, "ab") as f:
        f.truncate(offset * width)
    _truncate_lines(index_file, meta["sequences"])
    while done < len(prompts):
        batch_no = done // cfg.batch_size
        ranks = order[done:done + cfg.batch_size]
        sampled = cfg.sample_every > 0 and batch_no % cfg.sample_every == cfg.sample_every - 1
        torch.manual_seed(cfg.seed * 1_000_003 + batch_no)  # a resumed batch draws what it would have drawn
        ids = [encoded[r] for r in ranks]
        t = time.perf_counter()
        replies = generate_batch(target, ids, cfg.max_new_tokens, pad, stop,
                                 temperature=cfg.temperature if sampled else 0.0, top_p=cfg.top_p)
        meta["generate_s"] += time.perf_counter() - t
        with open(tokens_file, "ab") as tf, open(index_file, "a") as jf:
            for rank, p, r in zip(ranks, ids, replies):
                seq = torch.cat([p, r]).numpy().astype(dtype)
                tf.write(seq.tobytes())
                jf.write(json.dumps({"offset": offset, "length": len(seq), "prompt_len": p.numel(),
                                     "sampled": sampled, "prompt": rank}) + "\n")
                offset += len(seq)
                meta["tokens"] += r.numel()
        done += len(ranks)
        meta["sequences"] += len(ranks)
        meta["conversations_used"] = done
        meta["tokens_per_s"] = round(meta["tokens"] / max(meta["generate_s"], 1e-9), 2)
        write_json(meta_file, meta)
        bar.update(len(ranks))
    bar.close()
    write_json(meta_file, meta)
    return meta


def answer_order(lengths: list[int], group: int) -> list[int]:
    """The order prompts are answered in: ``group`` consecutive prompts at a time sorted by token length
    (stable), the groups in their own order; ``group`` 0 keeps the given order."""
    idx = list(range(len(lengths)))
    if group <= 0:
        return idx
    return [i for g in range(0, len(idx), group) for i in sorted(idx[g:g + group], key=lambda i: lengths[i])]


def _recorded_tokens(index_file: str, sequences: int) -> int:
    """Tokens of the first ``sequences`` index lines."""
    if not os.path.isfile(index_file) or sequences == 0:
        return 0
    with open(index_file) as f:
        lines = [json.loads(x) for _, x in zip(range(sequences), f)]
    return lines[-1]["offset"] + lines[-1]["length"]


def _truncate_lines(path: str, keep: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    if len(lines) > keep:
        with open(path, "w") as f:
            f.writelines(lines[:keep])


def distilled_sequences(out_dir: str, max_len: int | None = None, with_loss_from: bool = False,
                        greedy_only: bool = False) -> Iterator:
    """The stored sequences (int64 ``[n]``: prompt then reply), in order, cut to ``max_len``; with
    ``with_loss_from`` as ``(ids, prompt_len - 1, {"sampled": bool})`` (``cache_hidden_states``: a draft is
    trained on the reply only, the prompt is its context; sampled replies are left out of the greedy
    acceptance figures). ``greedy_only`` skips the sampled replies."""
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    data = np.fromfile(os.path.join(out_dir, "tokens.bin"), dtype=meta["dtype"])
    with open(os.path.join(out_dir, "index.jsonl")) as f:
        for _, line in zip(range(meta["sequences"]), f):
            row = json.loads(line)
            if greedy_only and row["sampled"]:
                continue
            seq = torch.from_numpy(data[row["offset"]:row["offset"] + row["length"]].astype(np.int64))
            seq = seq[:max_len] if max_len else seq
            yield (seq, max(0, row["prompt_len"] - 1), {"sampled": bool(row["sampled"])}) if with_loss_from else seq
