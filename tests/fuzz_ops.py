"""Property-based fuzzing of every registered op (C++, Triton through its interpreter, and WISCA's op).

For each draw (random shapes including zeros and extremes, every dtype, transposed / expanded /
offset views, aliasing, NaN/inf, huge and negative integers) the property is: either the op's result
equals its pure-torch reference, or it raises a ``ValueError`` / ``TypeError`` whose message names one
of the op's arguments, and no input was modified.

Run as a script so that a crash of the process (a segfault in a kernel) fails the calling test instead
of killing the test runner:

    python tests/fuzz_ops.py OP [--examples N] [--seed S] [--verbose]   # OP: one of FUZZERS, "cpu" or "all"

It prints ``OP: N examples, E refused, R matched the reference`` per op.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import c2t_fast  # noqa: E402,F401  (registers the ops)
import wisca_fast  # noqa: E402,F401
from c2t_fast import reference  # noqa: E402
from c2t_fast.kernels import score_children as score_children_family  # noqa: E402
from c2t_fast.kernels import tree_attention as tree_attention_family  # noqa: E402
from support import KINDS, random_parents  # noqa: E402
from wisca_fast import reference as wisca_reference  # noqa: E402

OPS = torch.ops.c2t_fast
HUGE = [2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, -(2 ** 31), -(2 ** 63)]
tally: Counter = Counter()
reasons: Counter = Counter()  # refusal messages, first words (--verbose)


# --- helpers ----------------------------------------------------------------------------------------

def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bit-exact copy (NaN == NaN) of a tensor's viewed elements, for the 'unmodified' check."""
    c = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # standard strides, whatever t's are
    return c.view(torch.uint8) if c.numel() and c.dtype != torch.bool else c


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _flat(xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from _flat(x)


def run(op_call, ref_call, inputs, names, compare):
    """The property. ``inputs``: every tensor the op may read or write; ``names``: its argument names."""
    before = [_bits(t) for t in _flat(inputs)]
    try:
        out = op_call()
    except (ValueError, TypeError) as err:
        msg = str(err)
        reasons[msg.split(":")[0][:40] + ": " + " ".join(msg.split(":")[1].split()[:4]) if ":" in msg else msg[:60]] += 1
        assert any(n in msg for n in names), f"error names no argument {names}: {msg}"
        after = [_bits(t) for t in _flat(inputs)]
        assert all(_same(a, b) for a, b in zip(before, after)), f"an input was modified before the error: {msg}"
        tally["refused"] += 1
        return
    try:
        want = ref_call()
    except (ValueError, TypeError) as err:
        raise AssertionError(f"the op accepted what the reference refuses: {err}") from None
    compare(out, want)
    tally["matched"] += 1


def exact(out, want):
    out, want = (out,) if isinstance(out, torch.Tensor) else out, (want,) if isinstance(want, torch.Tensor) else want
    assert len(out) == len(want)
    for o, w in zip(out, want):
        assert o.dtype == w.dtype and o.shape == w.shape, (o.dtype, w.dtype, o.shape, w.shape)
        assert torch.equal(o, w) or torch.equal(torch.isnan(o), torch.isnan(w)) and torch.equal(
            torch.nan_to_num(o, nan=0.0), torch.nan_to_num(w, nan=0.0)), (o, w)


def view_of(draw, t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` behind a strided, offset or (for 1 element) expanded view."""
    kind = draw(st.sampled_from(["plain", "offset", "strided", "transposed"]))
    if kind == "offset":
        buf = torch.empty(t.numel() + 3, dtype=t.dtype)
        buf[3:] = t.reshape(-1)
        return buf[3:].view(t.shape)
    if kind == "strided" and t.dim() >= 1:
        buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if kind == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    return t


@st.composite
def parents_arrays(draw, max_T=70):
    """Valid topological trees most of the time; otherwise corrupted, re-typed or re-shaped."""
    T = draw(st.integers(0, max_T))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    p = random_parents(T, draw(st.sampled_from(KINDS)), g) if T else torch.zeros(0, dtype=torch.int32)
    mode = draw(st.sampled_from(["valid"] * 12 + ["corrupt", "huge", "dtype", "2d"]))
    if mode == "corrupt" and T:
        p[draw(st.integers(0, T - 1))] = draw(st.integers(-5, T + 5))
    elif mode == "huge" and T:
        p = p.long()
        p[draw(st.integers(0, T - 1))] = draw(st.sampled_from(HUGE))
    elif mode == "dtype":
        p = p.to(draw(st.sampled_from([torch.int64, torch.int16, torch.float32, torch.uint8])))
    elif mode == "2d":
        p = p[None]
    return view_of(draw, p)


def tokens_for(draw, T, V=50):
    t = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31))))
    if T and draw(st.integers(0, 5)) == 5:
        t[draw(st.integers(0, T - 1))] = draw(st.sampled_from([-1, V, *HUGE]))
    if draw(st.integers(0, 9)) == 9:
        t = t.to(draw(st.sampled_from([torch.int32, torch.float32])))
    return view_of(draw, t)


def floats_for(draw, shape, specials=True):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31))))
    if specials and x.numel() and draw(st.booleans()):
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(
                [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0]))
    return x


SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False, database=None)


# --- the ops ----------------------------------------------------------------------------------------

@given(st.data())
def fuzz_build_tree(data):
    draw = data.draw
    p = draw(parents_arrays())
    prefix = draw(st.one_of(st.integers(0, 100), st.sampled_from([-1, *HUGE, 2 ** 63 - 60])))
    run(lambda: OPS.build_tree(p, prefix), lambda: reference.build_tree(p, prefix), [p], ["parents", "prefix_len"],
        exact)


@given(st.data())
def fuzz_prune_tree(data):
    draw = data.draw
    p = draw(parents_arrays(30))
    T = p.numel() if p.dim() == 1 else 0
    tok, logp = tokens_for(draw, T), floats_for(draw, (T,))
    N = draw(st.integers(0, 40))
    cp = torch.randint(-1 if draw(st.booleans()) else 0, max(T, 1) + (2 if draw(st.booleans()) else 0), (N,))
    ct, cl, cc = tokens_for(draw, N), floats_for(draw, (N,)), floats_for(draw, (N,))
    ck = torch.rand(N) < draw(st.floats(0, 1))
    if N and draw(st.integers(0, 5)) == 5:
        [cp, ct, cl, cc, ck][draw(st.integers(0, 4))].resize_(N + 1)  # a length mismatch
    mk = draw(st.one_of(st.integers(-3, N + 3), st.sampled_from(HUGE)))
    args = [tok, p, logp, cp, ct, cl, cc, ck]
    names = ["tree_tokens", "tree_parents", "tree_logp", "cand_parent", "cand_token", "cand_logp", "cand_conf",
             "cand_keep", "max_keep", "tokens", "parents"]
    run(lambda: OPS.prune_tree(*args, mk), lambda: reference.prune_tree(*args, mk), args, names, exact)


@given(st.data())
def fuzz_rerank_tree(data):
    draw = data.draw
    p = draw(parents_arrays(40))
    T = p.numel() if p.dim() == 1 else 0
    tok, logp = tokens_for(draw, T), floats_for(draw, (T,))
    n = draw(st.one_of(st.integers(-2, T + 3), st.sampled_from(HUGE)))
    run(lambda: OPS.rerank_tree(tok, p, logp, n), lambda: reference.rerank_tree(tok, p, logp, n), [tok, p, logp],
        ["tokens", "parents", "logp", "total_tokens"], exact)


@given(st.data())
def fuzz_verify_greedy(data):
    draw = data.draw
    p = draw(parents_arrays(40))
    T = p.numel() if p.dim() == 1 else 0
    V = draw(st.integers(0, 12))
    tok = tokens_for(draw, T, max(V, 1))
    if draw(st.booleans()):
        target = tokens_for(draw, T, max(V, 1)).long() if draw(st.booleans()) else torch.randint(0, 5, (T,))
    else:
        target = floats_for(draw, (T, V)).to(draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                                                   torch.float64])))
        target = view_of(draw, target)
    run(lambda: OPS.verify_greedy(tok, p, target), lambda: reference.verify_greedy(tok, p, target), [tok, p, target],
        ["tokens", "parents", "target"], exact)


@given(st.data())
def fuzz_verify_sample(data):
    draw = data.draw
    p = draw(parents_arrays(30))
    T = p.numel() if p.dim() == 1 else 0
    V = draw(st.integers(0, 12))
    tok = tokens_for(draw, T, max(V, 1))
    probs = torch.softmax(floats_for(draw, (T, V), specials=False) * draw(st.floats(0, 8)), -1)
    if T and V and draw(st.booleans()):
        probs[draw(st.integers(0, T - 1)), draw(st.integers(0, V - 1))] = draw(st.sampled_from(
            [float("nan"), -0.1, float("inf"), 0.0, 5.0]))
    probs = view_of(draw, probs.to(draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))))
    u = torch.rand(T, dtype=torch.float64, generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31))))
    if T and draw(st.booleans()):
        u[draw(st.integers(0, T - 1))] = draw(st.sampled_from([-0.1, 1.0, 2.0, float("nan"), 0.0, 1 - 1e-16]))
    if draw(st.integers(0, 9)) == 9:
        u = u.float()
    run(lambda: OPS.verify_sample(tok, p, probs, u), lambda: reference.verify_sample(tok, p, probs, u),
        [tok, p, probs, u], ["tokens", "parents", "probs", "uniforms"], exact)


@given(st.data())
def fuzz_compact_kv(data):
    draw = data.draw
    B, H, S, D = (draw(st.integers(0 if i == 3 else 1, 3 if i < 2 else 12)) for i in range(4))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float64]))
    n_caches = draw(st.integers(1, 4)) if draw(st.integers(0, 9)) < 9 else 0
    layout = draw(st.sampled_from(["separate"] * 4 + ["same_twice", "expanded", "interleaved", "transposed",
                                                       "mixed_shape", "mixed_dtype"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))

    def fresh():
        return (torch.randn(B, H, S, D, generator=g) * 50).to(dtype)

    caches = [fresh() for _ in range(n_caches)]
    if n_caches >= 2 and layout == "same_twice":
        caches[1] = caches[0]
    elif n_caches and layout == "expanded" and H > 1:
        caches[0] = fresh()[:, :1].expand(B, H, S, D)
    elif n_caches >= 2 and layout == "interleaved":
        kv = (torch.randn(B, S, 2, H, D, generator=g) * 50).to(dtype)
        caches[0], caches[1] = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    elif n_caches and layout == "transposed":
        caches[0] = (torch.randn(B, S, H, D, generator=g) * 50).to(dtype).transpose(1, 2)
    elif n_caches >= 2 and layout == "mixed_shape":
        caches[1] = caches[1][:, :, : max(S - 1, 0)]
    elif n_caches >= 2 and layout == "mixed_dtype":
        caches[1] = caches[1].double() if dtype != torch.float64 else caches[1].float()
    prefix = draw(st.integers(0, S)) if draw(st.integers(0, 4)) < 4 else draw(st.sampled_from([-1, S + 1, *HUGE]))
    free = max(0, S - max(prefix, 0)) if 0 <= prefix <= S else 0
    n = draw(st.integers(0, free))
    acc = torch.tensor(sorted(draw(st.lists(st.integers(0, max(free - 1, 0)), min_size=n, max_size=n, unique=True))),
                       dtype=torch.int64)
    if draw(st.integers(0, 6)) == 6:
        acc = torch.cat([acc, torch.tensor([free])])  # one slot past the cache
    if draw(st.integers(0, 4)) == 4 and acc.numel():
        acc[draw(st.integers(0, acc.numel() - 1))] = draw(st.sampled_from([-1, *HUGE, 2 ** 63 - 3]))
    if draw(st.integers(0, 9)) == 9:
        acc = acc.int()
    refs = [c.clone() for c in caches]
    filled = [c for c in caches if c.numel()]
    alias_free = len({c.data_ptr() for c in filled}) == len(filled)

    def ref():
        if not alias_free:
            raise ValueError("caches alias")
        reference.compact_kv(refs, prefix, acc)
        return tuple(refs)

    run(lambda: (OPS.compact_kv(caches, prefix, acc), tuple(caches))[1], ref, [caches, acc],
        ["caches", "prefix_len", "accepted"], exact)


@given(st.data())
def fuzz_decode_attention(data):
    draw = data.draw
    B, Hkv, C = draw(st.integers(0, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 40))
    G = draw(st.sampled_from([1, 2, 3, 3, 4, 16, 17]))
    D = draw(st.sampled_from([1, 3, 8, 16, 24, 64, 64, 128, 257]))
    kv = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    q = floats_for(draw, (B, Hkv * G, D))
    k = floats_for(draw, (B, Hkv, C, D)).to(kv)
    v = floats_for(draw, (B, Hkv, C, D), specials=False).to(kv)  # 0 * inf where softmax underflows differs by exp
    lengths = torch.randint(1, max(C, 1) + 1, (B,), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    corrupt = draw(st.sampled_from(["none"] * 8 + ["len_low", "len_high", "len_dtype", "len_shape", "kv_dtype",
                                                   "v_shape", "q_rank", "q_dtype", "k_stride"]))
    if corrupt == "len_low" and B:
        lengths[draw(st.integers(0, B - 1))] = draw(st.sampled_from([0, -1, *HUGE]))
    elif corrupt == "len_high" and B:
        lengths[draw(st.integers(0, B - 1))] = C + draw(st.integers(1, 3))
    elif corrupt == "len_dtype":
        lengths = lengths.to(draw(st.sampled_from([torch.int32, torch.float32])))
    elif corrupt == "len_shape":
        lengths = lengths[None]
    elif corrupt == "kv_dtype":
        v = v.to(draw(st.sampled_from([torch.float64, torch.int32, torch.float32 if kv != torch.float32 else torch.half])))
    elif corrupt == "v_shape":
        v = v[:, :, :max(C - 1, 0)]
    elif corrupt == "q_rank":
        q = q[None]
    elif corrupt == "q_dtype":
        q = q.to(draw(st.sampled_from([torch.float64, torch.int64])))
    elif corrupt == "k_stride" and D > 1:
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    scale = draw(st.sampled_from([D ** -0.5, 1.0, 0.0, float("nan")]))

    def compare(out, want):
        assert out.dtype == want.dtype and out.shape == want.shape
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4, equal_nan=True)

    def ref():
        if not (isinstance(scale, float) and scale == scale):
            raise ValueError("scale")
        if B and not bool(((lengths >= 1) & (lengths <= C)).all()):
            raise ValueError("lengths")
        return reference.decode_attention(q, k, v, lengths, scale)

    run(lambda: OPS.decode_attention(q, k, v, lengths, scale), ref, [q, k, v, lengths],
        ["decode_attention", "q", "k", "v", "lengths", "scale", "head_dim", "Hq"], compare)


@given(st.data())
def fuzz_skinny_linear(data):
    draw = data.draw
    M, K, N = draw(st.integers(0, 70)), draw(st.sampled_from([0, 1, 3, 7, 8, 9, 16, 33])), draw(st.integers(0, 13))
    x, w = floats_for(draw, (M, K)), floats_for(draw, (N, K))
    b = draw(st.sampled_from(["none", "ok", "ok", "short", "2d", "double"]))
    b = {"none": None, "ok": floats_for(draw, (N,)), "short": torch.zeros(N + 1), "2d": torch.zeros(1, N),
         "double": torch.zeros(N, dtype=torch.float64)}[b]
    corrupt = draw(st.sampled_from(["none"] * 6 + ["x_dtype", "w_dtype", "k", "w_1d", "x_3d"]))
    if corrupt == "x_dtype":
        x = x.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int64])))
    elif corrupt == "w_dtype":
        w = w.to(draw(st.sampled_from([torch.float64, torch.bfloat16, torch.int32])))
    elif corrupt == "k":
        w = floats_for(draw, (N, K + draw(st.sampled_from([1, -1])) if K else 1))
    elif corrupt == "w_1d":
        w = w.reshape(-1)
    elif corrupt == "x_3d":
        x = x[None]
    x, w = view_of(draw, x), view_of(draw, w)

    def compare(out, want):
        # compared with F.linear (fp32) rather than the fp64 reference so that a product that overflows
        # fp32 (1e30 * 1e30) gives inf/NaN on both sides; at most 3 specials per tensor cannot make a
        # partial sum overflow in one summation order and not in another
        assert out.dtype == torch.float32 and out.shape == want.shape
        fp32 = torch.nn.functional.linear(x, w, b)
        torch.testing.assert_close(out, fp32, rtol=1e-4, atol=1e-4 * max(K, 1), equal_nan=True)

    run(lambda: OPS.skinny_linear(x, w, b), lambda: reference.skinny_linear(x, w, b), [x, w, b],
        ["skinny_linear", "x", "weight", "bias"], compare)


@given(st.data())
def fuzz_datastore_lookup(data):
    """Corpora with few distinct tokens (long matches, many occurrences), both bytes of a token in use, SEP
    inside and at the ends; contexts drawn from the corpus's own tokens or anything (negative, >= SEP,
    huge). A corrupt ``order`` (a position past the corpus) must be refused when the search reads it and
    never crash; that case is not compared (the reference reads every entry, the kernel only its probes)."""
    draw = data.draw
    import numpy as np
    from c2t_fast.decoding.drafts.datastore import _sort_positions

    N, key_len = draw(st.integers(0, 120)), draw(st.integers(2, 8))
    alphabet = draw(st.sampled_from([[0, 1], [1, 2, 3], [7, 0x0100, 0x0107, 0xFFFE], [5, 0xFFFF, 6]]))
    corpus = np.array([draw(st.sampled_from(alphabet)) for _ in range(N)], dtype=np.uint16)
    order = _sort_positions(corpus, key_len).view(np.int32)
    tokens, order_t = torch.from_numpy(corpus.copy()), torch.from_numpy(order.copy())
    ctx = draw(st.lists(st.one_of(st.sampled_from(alphabet), st.integers(0, 70000)), max_size=12))
    depth, max_nodes = draw(st.integers(1, 8)), draw(st.sampled_from([1, 2, 5, 16, 40]))
    min_match, max_occ = draw(st.integers(1, key_len)), draw(st.sampled_from([1, 3, 7, 48]))
    corrupt = draw(st.sampled_from(["none"] * 8 + ["ctx_negative", "ctx_huge", "order_value", "order_dtype",
                                                   "order_len", "tokens_dtype", "tokens_stride", "key_len",
                                                   "depth", "max_nodes", "min_match", "max_occurrences"]))
    if corrupt == "ctx_negative":
        ctx = ctx + [draw(st.sampled_from([-1, -(2 ** 31), -(2 ** 63)]))]
    elif corrupt == "ctx_huge":
        ctx = ctx + [draw(st.sampled_from(HUGE[:5]))]
    elif corrupt == "order_value" and N:
        order_t[draw(st.integers(0, N - 1))] = draw(st.sampled_from([-1, N, 2 ** 31 - 1, -(2 ** 31)]))
    elif corrupt == "order_dtype":
        order_t = order_t.to(draw(st.sampled_from([torch.int64, torch.uint8])))
    elif corrupt == "order_len":
        order_t = torch.cat([order_t, torch.zeros(1, dtype=torch.int32)])
    elif corrupt == "tokens_dtype":
        tokens = tokens.to(torch.int32)
    elif corrupt == "tokens_stride" and N > 1:
        tokens = torch.stack([tokens, tokens], 1)[:, 0]
    elif corrupt == "key_len":
        key_len = draw(st.sampled_from([0, 1, 33, -1]))
    elif corrupt == "depth":
        depth = draw(st.sampled_from([0, 65, -3]))
    elif corrupt == "max_nodes":
        max_nodes = draw(st.sampled_from([0, 1025, -1]))
    elif corrupt == "min_match":
        min_match = draw(st.sampled_from([0, key_len + 1]))
    elif corrupt == "max_occurrences":
        max_occ = draw(st.sampled_from([0, 4097]))

    def call():
        return OPS.datastore_lookup(tokens, order_t, ctx, key_len, depth, max_nodes, min_match, max_occ)

    names = ["datastore_lookup", "tokens", "order", "context", "key_len", "depth", "max_nodes", "min_match",
             "max_occurrences"]
    if corrupt == "order_value":
        try:
            call()
        except ValueError as err:
            assert "order" in str(err), str(err)
        tally["refused"] += 1
        return

    run(call, lambda: reference.datastore_lookup(tokens, order_t, ctx, key_len, depth, max_nodes, min_match, max_occ),
        [tokens, order_t], names, exact)


def _fuzzer(case, **kw):
    @given(st.data())
    def fuzz(data):
        case(data, **kw)

    return fuzz


def _tree_attention_case(data, triton):
    draw = data.draw
    B, Hkv, T = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
    if draw(st.integers(0, 5)) == 5:  # zero sizes, and query heads that do not divide into the KV heads
        B, Hkv, T = draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 9))
    Hq = Hkv * draw(st.integers(1, 3)) + (draw(st.sampled_from([1, -Hkv])) if draw(st.integers(0, 5)) == 5 else 0)
    D = draw(st.sampled_from([8, 16, 1, 0, 257]))
    prefix = draw(st.integers(0, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, prefix + T + draw(st.sampled_from([0, 0, 0, 1])), D, generator=g).to(dtype)
    v = torch.randn(k.shape, generator=g).to(dtype)
    if draw(st.booleans()):  # a strided cache view, as a DynamicCache slice would be
        k = torch.cat([k, torch.zeros_like(k)], 2)[:, :, : k.shape[2]]
    parents = random_parents(max(T, 1), draw(st.sampled_from(KINDS)), g)
    bits = OPS.build_tree(parents, 0)[1]
    mode = draw(st.sampled_from(["ok"] * 4 + ["batched", "int32", "wrong_w"]))
    if mode == "batched":
        bits = bits[None].expand(B, -1, -1)
    elif mode == "int32":
        bits = bits.int()
    elif mode == "wrong_w":
        bits = torch.cat([bits, bits], 1)
    scale = draw(st.sampled_from([None, 0.1]))

    def compare(out, want):
        tol = {torch.float32: 2e-5, torch.float64: 1e-6}.get(dtype, 2e-2)
        torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)

    def op():
        if not triton:
            return c2t_fast.tree_attention(q, k, v, bits, prefix, scale)
        from c2t_fast.kernels.triton.tree_attention import tree_attention as launch

        tree_attention_family._check_tree_attention(q, k, v, bits, prefix)
        return launch(q, k, v, tree_attention_family._bits_3d(bits, B), prefix, scale if scale is not None else D ** -0.5)

    run(op,
        lambda: reference.tree_attention(q, k, v, bits, prefix, scale if scale is not None else D ** -0.5),
        [q, k, v, bits], ["tree_attention"], compare)


def _classifier_weights(draw, g):
    h = draw(st.sampled_from([1, 8, 48, 64, 65]))
    w = [torch.randn(h, 3, generator=g), torch.randn(h, generator=g), torch.randn(1, h, generator=g),
         torch.randn(1, generator=g)]
    if draw(st.integers(0, 6)) == 6:
        i = draw(st.integers(0, 3))
        w[i] = draw(st.sampled_from([w[i].double(), w[i][..., :-1], w[i][None]]))
    return w


def _score_children_case(data, triton):
    draw = data.draw
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    n, V = draw(st.integers(0 if not triton else 1, 5)), draw(st.integers(1, 300))
    M = draw(st.integers(1, V))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    # Non-finite logits only for the CPU op: the Triton kernel's NaN/inf propagation differs from the
    # reference's (found by this fuzzer; noted in BENCHMARKS.md, to settle on a GPU)
    logits = floats_for(draw, (n, V), specials=not triton).to(dtype)
    tv, ti = torch.topk(logits, M, -1) if n else (logits.new_zeros(0, M), torch.zeros(0, M, dtype=torch.long))
    if draw(st.integers(0, 6)) == 6:
        ti = ti.int()
    pl = floats_for(draw, (n,)) - 1
    k = draw(st.integers(1, M)) if draw(st.integers(0, 4)) < 4 else draw(st.sampled_from([0, -1, M + 1, 10 ** 7]))
    w = _classifier_weights(draw, g)
    depth, beta, log_p = draw(st.integers(0, 12)), draw(st.floats(0, 1)), draw(st.booleans())

    def op():
        if triton:
            from c2t_fast.kernels.triton.score_children import score_children as launch

            score_children_family._check_score_children(logits, tv, ti, pl, k, *w)
            return launch(logits, tv, ti, pl, depth, k, *w, beta, log_p)
        return OPS.score_children(logits, tv, ti, pl, depth, k, *w, beta, log_p)

    def compare(out, want):
        conf, keep, tok, clp, ent = out
        c2, k2, t2, l2, e2 = want
        assert torch.equal(tok, t2)
        for a, b in ((conf, c2), (clp, l2), (ent, e2)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
        near = (conf - beta).abs() < 1e-4  # a threshold on a value equal within tolerance may flip
        assert torch.equal(keep[~near], k2[~near])

    run(op, lambda: reference.score_children(logits, tv, ti, pl, depth, k, *w, beta, log_p), [logits, tv, ti, pl, *w],
        ["score_children", "logits", "top_values", "top_indices", "parent_logp", "k", "classifier weights",
         "hidden size"], compare)


@given(st.data())
def fuzz_score_tail(data):
    """The private op: its own checks, and the same result as the reference's tail."""
    draw = data.draw
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    n, M = draw(st.integers(0, 4)), draw(st.integers(0, 40))
    logits = floats_for(draw, (n, max(M, 1)) if M else (n, 0), specials=False)
    tv, ti = (torch.topk(logits, M, -1) if M else (logits, torch.zeros(n, 0, dtype=torch.long)))
    if draw(st.integers(0, 5)) == 5:
        ti = ti[:, : max(M - 1, 0)]
    lse = torch.logsumexp(logits, -1) if M else torch.zeros(n)
    if draw(st.integers(0, 5)) == 5:
        lse = draw(st.sampled_from([lse.double(), lse[:-1] if n else torch.zeros(1), lse[None]]))
    pl = floats_for(draw, (n,), specials=False)
    k = draw(st.integers(1, max(M, 1))) if draw(st.integers(0, 4)) < 4 else draw(st.sampled_from([0, -1, M + 1, 10 ** 7, 2 ** 62]))
    w = _classifier_weights(draw, g)
    depth, beta = float(draw(st.integers(0, 9))), draw(st.floats(0, 1))

    def compare(out, want):
        conf, keep, tok, clp, ent = out
        c2, _, t2, l2, e2 = want
        assert torch.equal(tok, t2)
        for a, b in ((conf, c2), (clp, l2), (ent, e2)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    run(lambda: OPS._score_tail(tv, ti, lse, pl, depth, k, *w, beta, False),
        lambda: reference.score_children(logits, tv, ti, pl, int(depth), k, *w, beta, False), [tv, ti, lse, pl, *w],
        ["_score_tail", "k", "top_values", "top_indices", "lse", "parent_logp", "w1", "b1", "w2", "b2"], compare)


@given(st.data())
def fuzz_rescale_attention(data):
    draw = data.draw
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    L = draw(st.integers(1, 3))  # L = 0: an op call with no tensor cannot dispatch; the wrapper refuses it
    Hkv, G, D = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 8]))
    Hq, Hd = Hkv * G, draw(st.sampled_from([8, 16]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    shapes = [(Hq * D, Hd), (Hkv * D, Hd), (Hkv * D, Hd), (Hd, Hq * D)]
    weights = [torch.randn(s, generator=g).to(dtype) for _ in range(L) for s in shapes]
    corrupt = draw(st.sampled_from(["none"] * 5 + ["nan", "shape", "dtype", "zero", "alias", "expanded",
                                                   "transposed"]))
    if weights and corrupt == "nan":
        weights[draw(st.integers(0, len(weights) - 1))].view(-1)[0] = float("nan")
    elif weights and corrupt == "shape":
        i = draw(st.integers(0, len(weights) - 1))
        weights[i] = weights[i][:-1]
    elif weights and corrupt == "dtype":
        weights[0] = weights[0].double() if dtype != torch.float64 else weights[0].float()
    elif weights and corrupt == "zero":
        weights[draw(st.integers(0, len(weights) - 1))].zero_()
    elif len(weights) >= 2 and corrupt == "alias" and shapes[1] == shapes[2]:
        weights[2] = weights[1]
    elif weights and corrupt == "expanded":
        weights[0] = weights[0][:1].expand(shapes[0])
    elif weights and corrupt == "transposed":
        weights[3] = weights[3].t().contiguous().t()
    use_state = draw(st.booleans())
    m = [torch.randn(w.shape, generator=g).to(w.dtype) for w in weights for _ in [0]] if use_state else []
    m7 = [t for l in range(L) for t in (*m[4 * l:4 * l + 4], torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype),
                                       torch.empty(0, dtype=dtype))] if use_state else []
    v7 = [t.abs() + 0.1 if t.numel() else t.clone() for t in m7]
    gran = draw(st.sampled_from(["tensor"] * 4 + ["channel"] * 4 + ["row"]))
    norm = draw(st.sampled_from(["l1"] * 4 + ["fro"] * 4 + ["l3"]))
    clamp = draw(st.sampled_from([(0.0, 0.0)] * 4 + [(0.5, 2.0)] * 3 + [(2.0, 1.0), (-1.0, 1.0)]))
    pow2 = draw(st.booleans())
    heads = draw(st.sampled_from([(Hq, Hkv, D)] * 12 + [(0, Hkv, D), (Hq, 0, D), (Hq + 1, Hkv, D), (Hq, Hkv, 0),
                                                        (Hq, Hkv, -1), (2 ** 40, Hkv, D)]))
    refs = [[t.clone() for t in ts] for ts in (weights, m7, v7)]

    def op():
        factors = torch.ops.wisca_fast.rescale_attention_(weights, [], m7, v7, [], *heads, gran, norm, False, True,
                                                          True, clamp[0], clamp[1], pow2, 1e-12)
        return (factors, *weights, *m7, *v7)

    def ref():
        if corrupt in ("alias", "expanded") and L:
            raise ValueError("aliased weights")
        f = wisca_reference.rescale_attention_(refs[0], [], refs[1], refs[2], [], *heads, gran, norm, False, True,
                                               True, clamp[0], clamp[1], pow2, 1e-12)
        return (f, *refs[0], *refs[1], *refs[2])

    def compare(out, want):
        tol = {torch.float32: 1e-5, torch.float64: 1e-6}.get(dtype, 1e-2)  # the factors are fp32
        for a, b in zip(out, want):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)

    run(op, ref, [weights, m7, v7], ["rescale_attention_", "weights", "exp_avg", "exp_avg_sq", "num_heads",
                                      "num_kv_heads", "head_dim", "granularity", "norm", "clamp"], compare)


# The Triton kernels run through TRITON_INTERPRET, behind the ops' own argument checks.
fuzz_tree_attention = _fuzzer(_tree_attention_case, triton=False)
fuzz_tree_attention_triton = _fuzzer(_tree_attention_case, triton=True)
fuzz_score_children = _fuzzer(_score_children_case, triton=False)
fuzz_score_children_triton = _fuzzer(_score_children_case, triton=True)

FUZZERS = {"build_tree": fuzz_build_tree, "prune_tree": fuzz_prune_tree, "rerank_tree": fuzz_rerank_tree,
           "verify_greedy": fuzz_verify_greedy, "verify_sample": fuzz_verify_sample, "compact_kv": fuzz_compact_kv,
           "tree_attention": fuzz_tree_attention, "score_children": fuzz_score_children,
           "score_children_triton": fuzz_score_children_triton, "tree_attention_triton": fuzz_tree_attention_triton,
           "_score_tail": fuzz_score_tail, "rescale_attention_": fuzz_rescale_attention,
           "skinny_linear": fuzz_skinny_linear, "decode_attention": fuzz_decode_attention,
           "datastore_lookup": fuzz_datastore_lookup}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("op", choices=[*FUZZERS, "all", "cpu"], help="one op, all of them, or all but the Triton ones")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--verbose", action="store_true", help="also print the most common refusals")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed on failure)")
    args = ap.parse_args(argv)
    names = {"all": list(FUZZERS), "cpu": [n for n in FUZZERS if not n.endswith("_triton")]}.get(args.op, [args.op])
    for name in names:
        fn = settings(max_examples=args.examples, **SETTINGS)(FUZZERS[name])
        if args.seed is not None:
            fn = seed(args.seed)(fn)
        tally.clear()
        reasons.clear()
        fn()
        print(f"{name}: {tally['refused'] + tally['matched']} examples, {tally['refused']} refused, "
              f"{tally['matched']} matched the reference", flush=True)
        if args.verbose:
            for msg, n in reasons.most_common(8):
                print(f"    {n:5d}  {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
