"""datastore_lookup: the continuations of a context's longest suffix in a suffix-sorted token corpus, for
the datastore drafter (``decoding.drafts.datastore``). C++ kernel in ``csrc/c2t/datastore_cpu.cpp``
(schema in ``csrc/c2t/ops.cpp``), CPU only: the corpus is host memory and the answer is a few dozen ids
the engine reads on the host anyway. This module holds the argument checks and the fake kernel."""

from __future__ import annotations

import torch

from . import library  # noqa: F401  (loads c2t_fast._C, which defines the op)

MAX_KEY_LEN, MAX_DEPTH, MAX_NODES, MAX_OCCURRENCES = 32, 64, 1024, 4096


def check(tokens, order, context, key_len, depth, max_nodes, min_match, max_occurrences) -> None:
    """ValueError naming the argument for anything the kernel refuses (``order``'s values are checked by the
    kernel as it reads them)."""
    op = "datastore_lookup"
    for name, t in (("tokens", tokens), ("order", order)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.device.type not in ("cpu", "meta"):
            raise ValueError(f"{op}: {name} must be a CPU tensor (the corpus lives in host memory), got {t.device}")
    if tokens.dtype != torch.uint16 or tokens.dim() != 1 or not tokens.is_contiguous():
        raise ValueError(f"{op}: tokens must be a contiguous uint16 vector, got {tokens.dtype} {tuple(tokens.shape)}")
    if order.dtype != torch.int32 or order.dim() != 1 or not order.is_contiguous():
        raise ValueError(f"{op}: order must be a contiguous int32 vector, got {order.dtype} {tuple(order.shape)}")
    if order.numel() != tokens.numel():
        raise ValueError(f"{op}: order must hold one position per token ({tokens.numel()}), got {order.numel()}")
    if not isinstance(context, (list, tuple)) or not all(type(t) is int for t in context):
        raise ValueError(f"{op}: context must be a list of int token ids, got {type(context).__name__}")
    for name, v, lo, hi in (("key_len", key_len, 2, MAX_KEY_LEN), ("depth", depth, 1, MAX_DEPTH),
                            ("max_nodes", max_nodes, 1, MAX_NODES), ("min_match", min_match, 1, key_len),
                            ("max_occurrences", max_occurrences, 1, MAX_OCCURRENCES)):
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"{op}: {name} must be an int in {lo}..{hi}, got {v!r}")


@torch.library.register_fake("c2t_fast::datastore_lookup")
def _fake(tokens, order, context, key_len, depth, max_nodes, min_match, max_occurrences):
    check(tokens, order, list(context), key_len, depth, max_nodes, min_match, max_occurrences)
    return tokens.new_empty(3 + 3 * max_nodes, dtype=torch.int64)


def datastore_lookup(tokens: torch.Tensor, order: torch.Tensor, context: list, key_len: int, depth: int,
                     max_nodes: int, min_match: int, max_occurrences: int) -> torch.Tensor:
    """The continuation tree of the longest suffix of ``context`` found in the corpus.

    tokens uint16 ``[N]`` (documents separated by 65535), order int32 ``[N]`` (positions sorted by the bytes
    of their first ``key_len`` tokens, the corpus padded with 65535: ``Datastore``'s index), context a list
    of token ids (its last ``key_len`` are matched; a negative id is an error, an id >= 65535 never matches)
    -> int64 ``[3 + 3 * max_nodes]``: (matched suffix length, its occurrences, nodes n), then the nodes'
    tokens, parents (indices of earlier nodes, -1 for the root's children) and counts, each ``max_nodes``
    long (-1 / -1 / 0 past the n nodes); all 0 / -1 when no suffix of ``min_match`` tokens occurs. Up to
    ``max_occurrences`` occurrences, spread evenly over them, give their next ``depth`` tokens; the
    ``max_nodes`` nodes of largest count are kept, parents first."""
    check(tokens, order, context, key_len, depth, max_nodes, min_match, max_occurrences)
    return torch.ops.c2t_fast.datastore_lookup(tokens, order, context, key_len, depth, max_nodes, min_match,
                                               max_occurrences)


def prepared_lookup(tokens: torch.Tensor, order: torch.Tensor, key_len: int, depth: int, max_nodes: int,
                    min_match: int, max_occurrences: int):
    """``datastore_lookup`` over one corpus and settings, checked here once: returns ``lookup(context)``
    (context a list of int token ids) for the call every decoding step makes, which then pays the kernel
    and torch's dispatch only (the kernel still checks every argument it is given)."""
    check(tokens, order, [], key_len, depth, max_nodes, min_match, max_occurrences)
    op = torch.ops.c2t_fast.datastore_lookup.default

    def lookup(context: list) -> torch.Tensor:
        return op(tokens, order, context, key_len, depth, max_nodes, min_match, max_occurrences)

    return lookup
