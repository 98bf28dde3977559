"""A datastore of the target's own text (REST, arXiv:2311.08252): at each step the longest suffix of the
context that occurs in the corpus, and the most frequent continuations of its occurrences, as a small
tree of draft tokens that costs no draft call.

The corpus is token ids (the target's replies from a self-distilled data set, never an evaluation prompt;
``training.datastore_build`` writes it), documents separated by ``SEP``. The index sorts every position
by the ``key_len`` tokens that start there (a suffix array cut at ``key_len``), so the positions whose
text begins with a query of up to ``key_len`` tokens form one range, found by two binary searches; the
longest matching suffix is found by bisecting over its length (a suffix that occurs has every shorter
suffix occurring too). The lookup is one C++ op (``kernels.datastore_lookup``) that reads the corpus
through the sorted positions; the index is built with numpy once per corpus (seconds per million
tokens) and cached beside the cost profiles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ...kernels import ops

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
        if tokens.size >= 2 ** 31:
            raise ValueError(f"Datastore: at most 2^31 - 1 tokens, got {tokens.size}")
        self.tokens, self.key_len = np.array(tokens, copy=True), key_len  # owned and writable: shared with torch
        self.order = _sort_positions(self.tokens, key_len) if order is None else order
        if self.order.shape != tokens.shape or self.order.dtype != np.uint32:
            raise ValueError("Datastore: order must be a uint32 vector of one position per token")
        if self.order.size and int(self.order.max()) >= tokens.size:
            raise ValueError("Datastore: order holds a position past the corpus")
        self._tokens_t = torch.from_numpy(self.tokens)
        self._order_t = torch.from_numpy(self.order.view(np.int32))  # positions < 2^31: the same bits
        self._lookups = {}  # (depth, max_nodes, min_match, max_occurrences) -> ops.prepared_lookup

    def __len__(self) -> int:
        return int(self.tokens.size)

    def lookup(self, context, depth: int = 6, max_nodes: int = 16, min_match: int = 2,
               max_occurrences: int = 48) -> Continuations | None:
        """The continuations of the longest suffix of ``context`` (token ids, the root last) that occurs,
        ``min_match`` tokens at least: a tree of at most ``max_nodes`` nodes and ``depth`` levels, the most
        frequent paths first, read from up to ``max_occurrences`` occurrences spread over all of them.
        None when no suffix of ``min_match`` tokens occurs (one call of the C++ ``datastore_lookup``)."""
        settings = (depth, max_nodes, min(min_match, self.key_len), max_occurrences)
        run = self._lookups.get(settings)
        if run is None:  # checked once per setting: the lookup runs every decoding step
            run = self._lookups[settings] = ops.prepared_lookup(self._tokens_t, self._order_t, self.key_len,
                                                                *settings)
        out = run([int(t) for t in context[-self.key_len:]]).tolist()  # a slice: the history grows long
        match, occurrences, n = out[:3]
        if n == 0:
            return None
        toks, parents, counts = out[3:3 + n], out[3 + max_nodes:3 + max_nodes + n], out[3 + 2 * max_nodes:][:n]
        rows = min(occurrences, max_occurrences)
        return Continuations(match, occurrences, toks, parents, counts,
                             [c / (counts[p] if p >= 0 else rows) for c, p in zip(counts, parents)])


def _sort_positions(tokens: np.ndarray, key_len: int) -> np.ndarray:
    """Every position sorted by the bytes of the ``key_len`` tokens starting there, the corpus padded with
    ``SEP`` (uint32). Keys compare as bytes: any fixed byte order of the 2-byte tokens sorts positions so
    that a prefix's matches are one range; the C++ lookup compares in this one, little-endian."""
    pad = np.concatenate([tokens, np.full(key_len, SEP, np.uint16)]).astype("<u2")
    win = np.lib.stride_tricks.sliding_window_view(pad, key_len)[:tokens.size]
    keys = np.ascontiguousarray(win).view(f"V{2 * key_len}").ravel()
    return np.argsort(keys, kind="stable").astype(np.uint32)


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
