"""The C2T classifier's training data: every drafted node of a step's full tree with its features and
whether the target accepted it.

Tree-dataset format (a directory, written by ``TreeRecorder``, read by ``open_tree_dataset``):

- ``rows.bin``: little-endian fixed-size records, numpy dtype ``ROW_DTYPE`` =
  ``P float32`` (joint probability of the root->node path), ``H float32`` (top-M entropy of the
  parent's distribution, nats), ``d int16`` (depth, root's children 0), ``label uint8`` (1 iff the
  target accepted the node), ``tree int64`` (id of the tree / verification step).
- ``meta.json``: ``{"format": "c2t-tree-rows", "version": 1, "dtype": ..., "rows": N, "trees": n,
  "positives": p, ...writer's metadata}``, rewritten on every flush.

Appending is streaming (rows go to disk in chunks; millions of rows never sit in memory), and the
reader memory-maps the file.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

ROW_DTYPE = np.dtype([("P", "<f4"), ("H", "<f4"), ("d", "<i2"), ("label", "u1"), ("tree", "<i8")])


class TreeRecorder:
    """Streams (P, H, d, label, tree) rows to a tree-dataset directory.

    ``add_tree(P, H, d, label)`` appends one tree (any array-likes of equal length) under a fresh
    tree id; rows are buffered and written in chunks of ``chunk_rows``. Use as a context manager or
    call ``close()``. Opening an existing directory appends (tree ids continue).
    """

    def __init__(self, path: str, metadata: dict | None = None, chunk_rows: int = 1 << 16):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.chunk_rows = chunk_rows
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.meta = {"format": "c2t-tree-rows", "version": 1, "dtype": ROW_DTYPE.descr, "rows": 0, "trees": 0,
                     "positives": 0}
        meta_file = os.path.join(path, "meta.json")
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                self.meta.update(json.load(f))
        self.meta.update(metadata or {})
        self._file = open(os.path.join(path, "rows.bin"), "ab")
        # rows written after the last meta (an interrupted run) are dropped: meta and rows agree again
        self._file.truncate(self.meta["rows"] * ROW_DTYPE.itemsize)

    wants_entropy = True  # the drafter keeps each node's entropy (C2T's H feature) for every strategy

    def on_step(self, drafter, path) -> None:
        """The engine's step hook: (P, H, d, accepted) of every drafted node of the step's full tree, before
        any rerank (``path``: the verified tree's accepted node indices, root first)."""
        label = torch.zeros(drafter.size, dtype=torch.uint8)
        on_path = path if drafter.selected is None else drafter.selected[path]  # reranked ids -> the full tree
        label[on_path.cpu()] = 1
        self.add_tree(drafter.logp[1:].exp().cpu(), drafter.entropy[1:].cpu(), drafter.depth[1:].cpu() - 1, label[1:])

    def add_tree(self, P, H, d, label) -> int:
        cols = [np.asarray(torch.as_tensor(x).cpu()) for x in (P, H, d, label)]
        n = len(cols[0])
        if any(len(c) != n for c in cols):
            raise ValueError(f"add_tree: P, H, d, label must have equal lengths, got {[len(c) for c in cols]}")
        rows = np.empty(n, ROW_DTYPE)
        rows["P"], rows["H"], rows["d"], rows["label"] = cols
        tree_id = self.meta["trees"]
        rows["tree"] = tree_id
        self._buf.append(rows)
        self._buffered += n
        self.meta["trees"] += 1
        self.meta["rows"] += n
        self.meta["positives"] += int(rows["label"].sum())
        if self._buffered >= self.chunk_rows:
            self.flush()
        return tree_id

    def flush(self) -> None:
        if self._buf:
            np.concatenate(self._buf).tofile(self._file)
            self._buf, self._buffered = [], 0
        self._file.flush()
        with open(os.path.join(self.path, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=2)

    def close(self) -> None:
        self.flush()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_tree_dataset(path: str) -> np.ndarray:
    """Memory-mapped structured array (``ROW_DTYPE``) of a tree-dataset directory."""
    meta_file, rows_file = os.path.join(path, "meta.json"), os.path.join(path, "rows.bin")
    if not os.path.isfile(meta_file) or not os.path.isfile(rows_file):
        raise FileNotFoundError(f"{path} is not a tree dataset (needs meta.json and rows.bin)")
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("format") != "c2t-tree-rows" or np.dtype([tuple(x) for x in meta["dtype"]]) != ROW_DTYPE:
        raise ValueError(f"{path}: unknown tree-dataset format {meta.get('format')!r} / dtype")
    size = os.path.getsize(rows_file)
    if size % ROW_DTYPE.itemsize:
        raise ValueError(f"{rows_file} is truncated ({size} bytes is not a multiple of {ROW_DTYPE.itemsize})")
    if size == 0:
        return np.empty(0, ROW_DTYPE)
    return np.memmap(rows_file, dtype=ROW_DTYPE, mode="r")


def collect_trees(target, tokenizer, draft, prompts: list[str], out: str, top_k: int = 10, depth: int = 10,
                  max_new_tokens: int = 128, metadata: dict | None = None, progress: bool = True) -> dict:
    """Generates a reply to each prompt with complete (never reranked) EAGLE-2 trees of ``top_k`` x
    ``depth`` and records every drafted node of every step to the tree dataset ``out``. Returns its
    meta (rows, trees, positives, ``prompts_done``). Resumable: the dataset is written after every
    prompt, and a rerun into ``out`` with the same settings continues after the prompts it has done."""
    from tqdm.auto import tqdm

    from ..decoding.engine import SpeculativeGenerator
    from ..decoding.strategies import Eagle2
    from ..hf.adapter import encode_chat

    total = 1 + top_k + depth * top_k * top_k  # the complete expanded tree: no rerank
    prompts_sha1 = hashlib.sha1("\x00".join(prompts).encode()).hexdigest()  # a rerun must answer the same prompts
    settings = {**(metadata or {}), "top_k": top_k, "depth": depth, "max_new_tokens": max_new_tokens,
                "prompts_sha1": prompts_sha1}
    meta_file = os.path.join(out, "meta.json")
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            old = json.load(f)
        clash = {k: (old.get(k), v) for k, v in settings.items() if k in old and old[k] != v}
        if clash:
            raise ValueError(f"{out} holds trees collected with other settings (was, now: {clash}); use another "
                             "directory")
    with TreeRecorder(out, settings) as rec:
        done = rec.meta.setdefault("prompts_done", 0)
        gen = SpeculativeGenerator(target, draft, Eagle2(top_k=top_k, depth=depth, total_tokens=total), recorder=rec)
        for text in tqdm(prompts[done:], desc="collect-trees", initial=done, total=len(prompts), disable=not progress):
            gen.generate(encode_chat(tokenizer, text), max_new_tokens=max_new_tokens)
            rec.meta["prompts_done"] += 1
            rec.flush()
    return rec.meta
