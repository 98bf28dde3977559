"""The draft head's training features of a generated data set, on local disk only: per shard of the
data set (``training.generator``), files whose rows are aligned with the shard's tokens:

- ``features.f16``: the residual streams entering the feature layers, fp16 ``[tokens, F]``;
- ``hidden.f16`` (optional): the post-norm last hidden state, fp16 ``[tokens, H]``;
- ``topk_ids.bin`` (uint16 when the vocabulary fits, else int32) and ``topk_logp.f16`` ``[tokens, k]``:
  the target's top-k next-token log-probabilities where the next token is the target's own (zero
  elsewhere).

``meta.json`` records, per shard, the tokens the files hold and where each job's rows are (``index``:
job number -> [offset, length]): jobs arrive in the order they finish, which need not be the data set's
order. The generator appends while it runs; a machine that lacks a shard's features (they are never
committed) rebuilds them from the token ids (``training.selfdistill_train.SelfDistillData``, one prefill
per job).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

FILES = ("features.f16", "hidden.f16", "topk_ids.bin", "topk_logp.f16")


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, swapped in whole (never a half-written file after an interruption)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class FeatureStore:
    """Append-only feature files of one data set. ``identity``: what the features must agree with (the
    data set's settings); a directory made for another data set is refused. ``budget_gb``: appends stop
    once the files reach it (the shards then stay partial and are recomputed when needed)."""

    def __init__(self, root: str, identity: dict, width: int, hidden: int, k: int, vocab: int,
                 budget_gb: float = 25.0):
        self.root, self.width, self.hidden, self.k = root, width, hidden, k
        self.id_dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<i4")
        self.budget = budget_gb * 1e9
        os.makedirs(root, exist_ok=True)
        self.meta_file = os.path.join(root, "meta.json")
        self.meta = {"identity": identity, "width": width, "hidden": hidden, "k": k, "shards": {}}
        if os.path.isfile(self.meta_file):
            with open(self.meta_file) as f:
                old = json.load(f)
            if old.get("identity") != identity or old.get("width") != width or old.get("k") != k:
                raise ValueError(f"{root} holds features of another data set or settings; use another features_dir")
            self.meta = old

    def _dir(self, shard: int) -> str:
        return os.path.join(self.root, f"shard_{shard:05d}")

    def covered(self, shard: int) -> dict:
        """``{"tokens": t, "index": {job: [offset, length]}}``: what the shard's files hold."""
        return self.meta["shards"].get(str(shard), {"tokens": 0, "index": {}})

    def has(self, shard: int, job: int) -> bool:
        return str(job) in self.covered(shard)["index"]

    def _row_bytes(self) -> dict:
        return {"features.f16": 2 * self.width, "hidden.f16": 2 * self.hidden,
                "topk_ids.bin": self.id_dtype.itemsize * self.k, "topk_logp.f16": 2 * self.k}

    def size_bytes(self) -> int:
        total = 0
        for d, _, files in os.walk(self.root):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
        return total

    def cut_back(self) -> None:
        """Every shard's files back to the rows the meta records (an interrupted append)."""
        for key, cov in self.meta["shards"].items():
            d = self._dir(int(key))
            for name, width in self._row_bytes().items():
                path = os.path.join(d, name)
                if os.path.isfile(path) and os.path.getsize(path) > cov["tokens"] * width:
                    with open(path, "r+b") as f:
                        f.truncate(cov["tokens"] * width)

    def append(self, shard: int, job: int, fin) -> bool:
        """Append a finished job's rows (``generator.Finished``) unless it is there or the budget is spent;
        returns whether they were written."""
        if fin.topk_ids is None or self.has(shard, job) or self.size_bytes_cached() >= self.budget:
            return False
        cov = self.meta["shards"].setdefault(str(shard), {"tokens": 0, "index": {}})
        n = fin.tokens.size
        d = self._dir(shard)
        os.makedirs(d, exist_ok=True)
        rows = {"features.f16": fin.features if self.width else None,
                "hidden.f16": fin.hidden if self.hidden else None,
                "topk_ids.bin": fin.topk_ids.astype(self.id_dtype), "topk_logp.f16": fin.topk_logp}
        for name, arr in rows.items():
            if arr is None:
                continue
            with open(os.path.join(d, name), "ab") as f:
                f.write(np.ascontiguousarray(arr).tobytes())
        self._size = self.size_bytes_cached() + n * sum(self._row_bytes()[k] for k, a in rows.items() if a is not None)
        cov["index"][str(job)] = [cov["tokens"], int(n)]
        cov["tokens"] += int(n)
        return True

    def size_bytes_cached(self) -> int:
        if not hasattr(self, "_size"):
            self._size = self.size_bytes()
        return self._size

    def flush(self) -> None:
        write_json(self.meta_file, self.meta)

    def open(self, shard: int) -> dict:
        """Memory-mapped arrays of the shard (``features``, ``hidden`` or None, ``topk_ids``, ``topk_logp``);
        a job's rows are ``covered(shard)["index"][str(job)]``."""
        d = self._dir(shard)
        t = self.covered(shard)["tokens"]

        def mm(name, dtype, width):
            path = os.path.join(d, name)
            if not width or not os.path.isfile(path) or t == 0:
                return None
            return np.memmap(path, dtype=dtype, mode="r", shape=(t, width))

        return {"features": mm("features.f16", np.float16, self.width),
                "hidden": mm("hidden.f16", np.float16, self.hidden),
                "topk_ids": mm("topk_ids.bin", self.id_dtype, self.k),
                "topk_logp": mm("topk_logp.f16", np.float16, self.k)}


def job_features(lm, tokens: np.ndarray, spans: list, k: int, capture_hidden: bool):
    """(features, hidden or None, topk_ids, topk_logp) of one stored job recomputed by one prefill of a
    fresh slot of ``lm`` (a :class:`hf.static_batch.StaticBatchLM` with one slot): the rows the generator
    writes, the never-fed last token's row zero."""
    n = tokens.size
    ids = torch.from_numpy(tokens.astype(np.int64))
    pos = sorted({p for a, b, _ in spans for p in range(a - 1, b - 1)})
    lm.reset(0)
    out = lm.prefill(0, ids[:n - 1], logits_at=torch.tensor(pos, dtype=torch.int64) if pos else None)
    feats = torch.zeros(n, out.features.shape[1] if out.features is not None else 0, dtype=torch.float16)
    if out.features is not None:
        feats[:n - 1] = out.features.to(torch.float16)
    hid = None
    if capture_hidden:
        hid = torch.zeros(n, out.hidden.shape[1], dtype=torch.float16)
        hid[:n - 1] = out.hidden.to(torch.float16)
    ti = torch.zeros(n, k, dtype=torch.int32)
    tl = torch.zeros(n, k, dtype=torch.float16)
    if pos:
        lg = out.logits
        vals, idx = lg.topk(k, -1)
        p = torch.tensor(pos)
        ti[p] = idx.to(torch.int32)
        tl[p] = (vals - torch.logsumexp(lg, -1, keepdim=True)).to(torch.float16)
    return feats.numpy(), None if hid is None else hid.numpy(), ti.numpy(), tl.numpy()
