"""The datastore's C++ lookup (``c2t_fast::datastore_lookup``) against its brute-force reference on fresh
random corpora, through torch.library.opcheck, and its argument checks (the fuzzer in fuzz_ops.py draws
malformed and extreme inputs in a subprocess)."""

import numpy as np
import pytest
import torch

from c2t_fast.decoding.drafts.datastore import SEP, Datastore, _sort_positions
from c2t_fast.kernels import datastore_lookup as family
from c2t_fast.kernels import ops, reference


def _corpus(rng, n, alphabet):
    tokens = rng.choice(np.array(alphabet, dtype=np.uint16), n)
    tokens[rng.random(n) < 0.04] = SEP
    return tokens


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_reference_on_random_corpora(seed):
    rng = np.random.default_rng(seed + 1000 * int(torch.randint(0, 1000, ())))
    found = 0
    for _ in range(40):
        alphabet = [[0, 1, 2], [3, 0x0103, 0x0301, 0xFFFE], list(range(40, 52))][int(rng.integers(3))]
        key_len = int(rng.integers(2, 9))
        tokens = _corpus(rng, int(rng.integers(1, 400)), alphabet)
        order = _sort_positions(tokens, key_len).view(np.int32)
        tok_t, ord_t = torch.from_numpy(tokens), torch.from_numpy(order)
        for _ in range(6):
            ctx = [int(t) for t in rng.choice(alphabet, int(rng.integers(0, 14)))]
            args = (key_len, int(rng.integers(1, 9)), int(rng.choice([1, 3, 16, 64])),
                    int(rng.integers(1, key_len + 1)), int(rng.choice([1, 2, 5, 48])))
            out = ops.datastore_lookup(tok_t, ord_t, ctx, *args)
            want = reference.datastore_lookup(tok_t, ord_t, ctx, *args)
            assert out.dtype == torch.int64 and torch.equal(out, want), (ctx, args, out, want)
            assert torch.equal(ops.prepared_lookup(tok_t, ord_t, *args)(ctx), want)
            found += int(out[2]) > 0
    assert found > 60  # most lookups found a suffix: the comparison is not between empty answers


def test_spread_over_many_occurrences_and_parents_first():
    tokens = np.array(([1, 2, 3, 4, SEP] * 30 + [1, 2, 5, SEP] * 10), dtype=np.uint16)
    store = Datastore(tokens, key_len=4)
    out = ops.datastore_lookup(store._tokens_t, store._order_t, [9, 1, 2], 4, 3, 8, 2, 16)
    match, occ, n = out[:3].tolist()
    assert (match, occ) == (2, 40) and n == 3  # "1 2" occurs 40 times; its continuations 3 4 / 5
    toks, parents, counts = out[3:3 + n].tolist(), out[11:11 + n].tolist(), out[19:19 + n].tolist()
    assert toks == [3, 5, 4] and parents == [-1, -1, 0] and counts[0] > counts[1] > 0
    assert torch.equal(out, reference.datastore_lookup(store._tokens_t, store._order_t, [9, 1, 2], 4, 3, 8, 2, 16))


def test_opcheck():
    rng = np.random.default_rng(0)
    tokens = _corpus(rng, 300, [1, 2, 3, 0x0201])
    order = torch.from_numpy(_sort_positions(tokens, 6).view(np.int32))
    torch.library.opcheck(torch.ops.c2t_fast.datastore_lookup, (torch.from_numpy(tokens), order, [1, 2, 3], 6, 4, 16,
                                                                2, 48))


@pytest.mark.parametrize("bad, name", [
    (dict(tokens=torch.zeros(5, dtype=torch.int32)), "tokens"),
    (dict(tokens=torch.zeros(10, dtype=torch.uint16)[::2]), "tokens"),
    (dict(order=torch.zeros(5, dtype=torch.int64)), "order"),
    (dict(order=torch.zeros(4, dtype=torch.int32)), "order"),
    (dict(context=[1, -2]), "context"),
    (dict(key_len=1), "key_len"), (dict(key_len=33), "key_len"),
    (dict(depth=0), "depth"), (dict(max_nodes=0), "max_nodes"), (dict(max_nodes=1025), "max_nodes"),
    (dict(min_match=0), "min_match"), (dict(min_match=5), "min_match"),
    (dict(max_occurrences=0), "max_occurrences"),
])
def test_bad_arguments_are_refused_naming_them(bad, name):
    tokens = np.array([1, 2, 1, 2, 3], dtype=np.uint16)
    args = dict(tokens=torch.from_numpy(tokens), order=torch.from_numpy(_sort_positions(tokens, 4).view(np.int32)),
                context=[1, 2], key_len=4, depth=3, max_nodes=4, min_match=2, max_occurrences=8)
    args.update(bad)
    for call in (ops.datastore_lookup, torch.ops.c2t_fast.datastore_lookup):  # the wrapper and the raw op
        with pytest.raises(ValueError, match=name):
            call(*args.values())


def test_a_corrupt_index_is_refused_not_read_past():
    tokens = np.array([1, 2, 1, 2, 3] * 10, dtype=np.uint16)
    order = torch.from_numpy(_sort_positions(tokens, 4).view(np.int32).copy())
    order[:] = 10 ** 6
    with pytest.raises(ValueError, match="order"):
        torch.ops.c2t_fast.datastore_lookup(torch.from_numpy(tokens), order, [1, 2], 4, 3, 4, 2, 8)
    with pytest.raises(ValueError, match="order"):
        Datastore(tokens, key_len=4, order=np.full(tokens.shape, 10 ** 6, np.uint32))


def test_context_ids_past_the_corpus_alphabet_never_match():
    tokens = np.array([1, 2, 1, 2, 3], dtype=np.uint16)
    store = Datastore(tokens, key_len=4)
    assert store.lookup([1, 2]) is not None
    assert store.lookup([1, 2, SEP]) is None and store.lookup([1, 2, 70000]) is None


def test_the_wrapper_refuses_a_context_that_is_not_a_list_of_ints():
    tokens = torch.from_numpy(np.array([1, 2, 1, 2, 3], dtype=np.uint16))
    order = torch.from_numpy(_sort_positions(tokens.numpy(), 4).view(np.int32))
    for ctx in (torch.tensor([1, 2]), [1.0, 2.0], "12"):
        with pytest.raises(ValueError, match="context"):
            family.datastore_lookup(tokens, order, ctx, 4, 3, 4, 2, 8)


@pytest.mark.parametrize("seed", range(3))
def test_long_ranges_end_where_the_reference_says(seed):
    """Suffixes occurring hundreds of times: the range's end is galloped to from its start, so its every
    distance from the start (powers of two and between) must land where the reference's does."""
    rng = np.random.default_rng(seed + 1000 * int(torch.randint(0, 1000, ())))
    tokens = rng.choice(np.array([5, 6], dtype=np.uint16), 3000)
    tokens[rng.random(3000) < 0.01] = SEP
    order = torch.from_numpy(_sort_positions(tokens, 6).view(np.int32))
    tok_t = torch.from_numpy(tokens)
    for _ in range(30):
        ctx = [int(t) for t in rng.choice([5, 6], int(rng.integers(1, 10)))]
        args = (6, 4, 16, 1, int(rng.choice([8, 4096])))
        want = reference.datastore_lookup(tok_t, order, ctx, *args)
        assert torch.equal(ops.datastore_lookup(tok_t, order, ctx, *args), want), ctx
        assert int(want[1]) > 20  # the matched suffix occurs many times


def test_a_prepared_lookup_refuses_bad_settings_before_any_call():
    tokens = np.array([1, 2, 1, 2, 3], dtype=np.uint16)
    tok_t, ord_t = torch.from_numpy(tokens), torch.from_numpy(_sort_positions(tokens, 4).view(np.int32))
    for bad, name in (((1, 3, 4, 2, 8), "key_len"), ((4, 0, 4, 2, 8), "depth"), ((4, 3, 4, 5, 8), "min_match")):
        with pytest.raises(ValueError, match=name):
            ops.prepared_lookup(tok_t, ord_t, *bad)
    run = ops.prepared_lookup(tok_t, ord_t, 4, 3, 4, 2, 8)
    with pytest.raises(ValueError, match="context"):
        run([1, -2])  # the kernel's own check
