"""A datastore of the target's own text (REST, arXiv:2311.08252): at each step the longest suffix of the
context that occurs in the corpus, and the most frequent continuations of its occurrences, as a small
tree of draft tokens that costs no draft call.

The corpus is token ids (the target's replies from a self-distilled data set, never an evaluation prompt;
``training.datastore_build`` writes it), documents separated by ``SEP``. The index sorts every position
by the ``key_len`` tokens that start there (a suffix array cut at ``key_len``), so the positions whose
text begins with a query of up to ``key_len`` tokens form one range, found by two binary searches; the
longest matching suffix is found by bisecting over its length (a suffix that occurs has every shorter
suffix occurring too). Built once per corpus (seconds per million tokens) and cached beside the cost
profiles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

SEP = 0xFFFF  # between documents (no vocabulary here reaches 65,535 ids: uint16 corpora only)
DEFAULT_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "data",
                                           "datastore"))  # c2t_fast/data/datastore


@dataclass
class Continuations:
    """A lookup's answer: ``match`` (tokens of the context matched), ``occurrences`` (how many times it
    occurs), and a tree of continuation tokens: ``tokens``, ``parents`` (-1: hangs from the root, else an
    earlier index), ``counts`` (occurrences that continue through the node), ``share`` (``counts`` over
    its parent's: the corpus's estimate of the node given its parent)."""

    match: int
    occurrences: int
    tokens: list
    parents: list
    counts: list
    share: list


class Datastore:
    """``tokens``: uint16 corpus (documents separated by ``SEP``); ``key_len``: the longest context
    suffix matched. ``order`` (the sorted positions) is built here unless given."""

    def __init__(self, tokens: np.ndarray, key_len: int = 12, order: np.ndarray | None = None):
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise ValueError(f"Datastore: tokens must be a uint16 vector, got {tokens.dtype} {tokens.shape}")
        if not 2 <= key_len <= 32:
            raise ValueError(f"Datastore: key_len must be in 2..32, got {key_len}")
        self.tokens, self.key_len = tokens, key_len
        # keys compare as bytes: any fixed byte order of the 2-byte tokens sorts positions so that a prefix's
        # matches are one range (0x0000 / 0xFFFF padding bound it in either order)
        pad = np.concatenate([tokens, np.full(key_len, SEP, np.uint16)])
        win = np.lib.stride_tricks.sliding_window_view(pad, key_len)[:tokens.size]
        self._keys = np.ascontiguousarray(win).view(f"V{2 * key_len}").ravel()
        self.order = np.argsort(self._keys, kind="stable").astype(np.uint32) if order is None else order
        if self.order.shape != tokens.shape:
            raise ValueError("Datastore: order must hold one position per token")
        self._sorted = self._keys[self.order]
        self._bounds = np.zeros((2, key_len), np.uint16)  # the query, padded low and high
        self._bound_keys = self._bounds.view(f"V{2 * key_len}").ravel()

    def __len__(self) -> int:
        return int(self.tokens.size)

    def _range(self, query: np.ndarray) -> tuple[int, int]:
        """[a, b) of the sorted positions whose text starts with ``query`` (uint16, at most key_len tokens)."""
        m = query.size
        b = self._bounds
        b[:, :m] = query
        b[0, m:] = 0
        b[1, m:] = 0xFFFF
        lo = np.searchsorted(self._sorted, self._bound_keys[:1], side="left")
        hi = np.searchsorted(self._sorted, self._bound_keys[1:], side="right")
        return int(lo[0]), int(hi[0])

    def lookup(self, context, depth: int = 6, max_nodes: int = 16, min_match: int = 2,
               max_occurrences: int = 48) -> Continuations | None:
        """The continuations of the longest suffix of ``context`` (token ids, the root last) that occurs,
        ``min_match`` tokens at least: a tree of at most ``max_nodes`` nodes and ``depth`` levels, the most
        frequent paths first, read from up to ``max_occurrences`` occurrences spread over all of them.
        None when no suffix of ``min_match`` tokens occurs."""
        ctx = np.asarray(list(context)[-self.key_len:], dtype=np.int64)
        if ctx.size < min_match or (ctx >= SEP).any():
            return None
        q = ctx.astype(np.uint16)
        best, lo_m, hi_m = None, min_match, ctx.size
        while lo_m <= hi_m:  # bisect the length: if a suffix occurs, every shorter one does
            m = (lo_m + hi_m) // 2
            a, b = self._range(q[ctx.size - m:])
            if b > a:
                best, lo_m = (m, a, b), m + 1
            else:
                hi_m = m - 1
        if best is None:
            return None
        m, a, b = best
        n = b - a
        pick = self.order[a:b] if n <= max_occurrences else self.order[a + (np.arange(max_occurrences) * n) // max_occurrences]
        starts = pick.astype(np.int64) + m
        idx = starts[:, None] + np.arange(depth)[None, :]
        cont = np.where(idx < self.tokens.size, self.tokens[np.minimum(idx, self.tokens.size - 1)], SEP)
        return _trie(cont, m, n, max_nodes)


def _trie(cont: np.ndarray, match: int, occurrences: int, max_nodes: int) -> Continuations | None:
    """The most frequent continuation paths of ``cont`` [n, depth] (rows stop at ``SEP``) as a tree: the
    ``max_nodes`` nodes of largest count (ties: shallower, then earlier), closed under parents (a parent's
    count is never below its child's, so the largest counts are already closed)."""
    node: dict[tuple, int] = {}  # (parent node, token) -> node id
    parent, token, count, depth = [], [], [], []
    for row in cont.tolist():
        at = -1
        for t in row:
            if t == SEP:
                break
            key = (at, t)
            i = node.get(key)
            if i is None:
                i = node[key] = len(token)
                parent.append(at)
                token.append(t)
                count.append(0)
                depth.append(depth[at] + 1 if at >= 0 else 1)
            count[i] += 1
            at = i
    if not token:
        return None
    chosen = sorted(range(len(token)), key=lambda i: (-count[i], depth[i], i))[:max_nodes]
    chosen.sort(key=lambda i: (depth[i], -count[i], i))  # topological: parents (shallower) first
    where = {i: j for j, i in enumerate(chosen)}
    if any(parent[i] >= 0 and parent[i] not in where for i in chosen):
        chosen = [i for i in chosen if parent[i] < 0 or parent[i] in where]  # a tie cut off a parent
        where = {i: j for j, i in enumerate(chosen)}
    total = cont.shape[0]
    return Continuations(match, occurrences, [token[i] for i in chosen],
                         [where[parent[i]] if parent[i] >= 0 else -1 for i in chosen], [count[i] for i in chosen],
                         [count[i] / (count[parent[i]] if parent[i] >= 0 else total) for i in chosen])


def _cache_dir() -> str:
    from ...hf.shipped import cache_root

    return os.path.join(cache_root(), "datastore_index")


def load_datastore(path: str | None = None, key_len: int = 12) -> Datastore:
    """The datastore in directory ``path`` (``tokens.npy`` + ``meta.json``; None: the shipped one), its
    index read from the cache or built (and cached) now."""
    path = path or DEFAULT_DIR
    file = os.path.join(path, "tokens.npy")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no datastore in {path!r} (expected tokens.npy; build one with "
                                "`c2t-fast build-datastore`)")
    tokens = np.load(file, mmap_mode="r")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"{file}: expected a uint16 vector, got {tokens.dtype} {tokens.shape}")
    tokens = np.asarray(tokens)
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    cached = os.path.join(_cache_dir(), f"{digest}-k{key_len}.npy")
    order = None
    if os.path.isfile(cached):
        try:
            order = np.load(cached)
            if order.shape != tokens.shape or order.dtype != np.uint32:
                order = None
        except (OSError, ValueError):
            order = None  # a damaged cache is rebuilt
    store = Datastore(tokens, key_len, order)
    if order is None:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = cached + f".{os.getpid()}.tmp.npy"
        np.save(tmp, store.order)
        os.replace(tmp, cached)
    return store


def datastore_meta(path: str | None = None) -> dict:
    with open(os.path.join(path or DEFAULT_DIR, "meta.json")) as f:
        return json.load(f)
