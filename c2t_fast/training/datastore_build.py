"""Building the datastore (``decoding.datastore``) from the target's own replies: the assistant spans of a
self-distilled data set's training jobs (``training.selfdistill``) and of earlier ``distill-data`` runs,
never a prompt and never an evaluation set. Written as ``tokens.npy`` (uint16, replies separated by
``SEP``) and ``meta.json`` (sources, counts)."""

from __future__ import annotations

import json
import os

import numpy as np

from ..decoding.drafts.datastore import SEP


def build_datastore(out_dir: str, data_dirs: tuple = (), distilled_dirs: tuple = (), max_tokens: int = 8_000_000) -> dict:
    """Write the datastore of up to ``max_tokens`` reply tokens (in the order given); returns its meta."""
    from .distill import distilled_sequences
    from .selfdistill import stored_jobs

    parts, total, sources = [], 0, []

    def add(ids: np.ndarray) -> bool:
        nonlocal total
        if ids.size == 0:
            return True
        if (ids >= SEP).any():
            raise ValueError("build_datastore: token ids must be below 65,535 (uint16 corpora)")
        room = max_tokens - total
        parts.append(ids[:room].astype(np.uint16))
        parts.append(np.array([SEP], dtype=np.uint16))
        total += min(ids.size, room) + 1
        return total < max_tokens

    go = True
    for d in data_dirs:
        n = 0
        for row in stored_jobs(d, split="train"):
            seq = row["tokens"].numpy()
            for a, b, _ in row["replies"]:
                go = add(seq[a:b])
                n += b - a
                if not go:
                    break
            if not go:
                break
        sources.append({"data": d, "reply_tokens": n})
        if not go:
            break
    for d in distilled_dirs if go else ():
        n = 0
        for ids, loss_from, _ in distilled_sequences(d, with_loss_from=True):
            go = add(ids.numpy()[loss_from + 1:])
            n += ids.numel() - loss_from - 1
            if not go:
                break
        sources.append({"distilled": d, "reply_tokens": n})
        if not go:
            break
    if not parts:
        raise ValueError("build_datastore: no reply tokens in the given data sets")
    tokens = np.concatenate(parts)
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "tokens.npy"), tokens)
    meta = {"format": "c2t-datastore", "tokens": int(tokens.size), "documents": int((tokens == SEP).sum()),
            "sources": sources, "bytes": int(tokens.nbytes)}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
