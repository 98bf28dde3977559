"""wisca_fast::rescale_attention_: the fused CPU kernel against the reference for every flag, function
preservation (wisca-method.md Appendix A), determinism, opcheck, and atomic failure on bad input."""

import itertools
import math

import pytest
import torch

import wisca_fast.ops as wops
from wisca_fast import reference as wref


def _layers(L, Hq, Hkv, D, C, dtype=torch.float32, bias=False, state=False, shadow=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype)

    out = []
    for l in range(L):
        lay = wops.AttentionTensors(r(Hq * D, C, s=0.5), r(Hkv * D, C, s=2.0), r(Hkv * D, C, s=0.3), r(C, Hq * D))
        if bias:
            lay.bq, lay.bk, lay.bv = r(Hq * D), r(Hkv * D), r(Hkv * D)
        if state:
            for k, t in (("q", lay.wq), ("k", lay.wk), ("v", lay.wv), ("o", lay.wo), ("bq", lay.bq), ("bk", lay.bk),
                         ("bv", lay.bv)):
                if t is not None:
                    lay.exp_avg[k] = torch.randn(t.shape, generator=gen) * 1e-3
                    lay.exp_avg_sq[k] = torch.rand(t.shape, generator=gen) * 1e-6
        if shadow:
            for k, t in (("q", lay.wq), ("k", lay.wk), ("v", lay.wv), ("o", lay.wo)):
                lay.shadows[k] = t.to(torch.bfloat16)
        out.append(lay)
    return out


def _flat(layers):
    ts = []
    for lay in layers:
        ts += [lay.wq, lay.wk, lay.wv, lay.wo] + [b for b in (lay.bq, lay.bk, lay.bv) if b is not None]
        ts += list(lay.exp_avg.values()) + list(lay.exp_avg_sq.values()) + list(lay.shadows.values())
    return ts


def _clone(layers):
    out = []
    for lay in layers:
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        out.append(wops.AttentionTensors(c(lay.wq), c(lay.wk), c(lay.wv), c(lay.wo), c(lay.bq), c(lay.bk), c(lay.bv),
                                         {k: v.clone() for k, v in lay.exp_avg.items()},
                                         {k: v.clone() for k, v in lay.exp_avg_sq.items()},
                                         {k: v.clone() for k, v in lay.shadows.items()}))
    return out


def _reference_call(layers, Hq, Hkv, D, **kw):
    """The reference on the same list layout as the op."""
    keys = ("q", "k", "v", "o", "bq", "bk", "bv")
    anchor = layers[0].wq
    e = lambda t: t if t is not None else anchor.new_empty(0)  # noqa: E731
    w = [t for lay in layers for t in (lay.wq, lay.wk, lay.wv, lay.wo)]
    b = [e(t) for lay in layers for t in (lay.bq, lay.bk, lay.bv)] if layers[0].bq is not None else []
    m = [e(lay.exp_avg.get(k)) for lay in layers for k in keys] if layers[0].exp_avg else []
    v = [e(lay.exp_avg_sq.get(k)) for lay in layers for k in keys] if layers[0].exp_avg else []
    sh = [e(lay.shadows.get(k)) for lay in layers for k in keys[:4]] if layers[0].shadows else []
    clamp = kw.pop("clamp", None) or (0.0, 0.0)
    return wref.rescale_attention_(w, b, m, v, sh, Hq, Hkv, D, kw.get("granularity", "tensor"), kw.get("norm", "l1"),
                                   kw.get("rope_interleaved", False), kw.get("qk", True), kw.get("vo", True),
                                   clamp[0], clamp[1], kw.get("pow2", False))


RTOL = {torch.float32: 2e-6, torch.float64: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(a, b):
    """Kernel (fp32 block sums, fp32 scaling) vs reference (fp64): equal up to one rounding step."""
    torch.testing.assert_close(a, b, rtol=RTOL[a.dtype], atol=0)


FLAGS = [dict(granularity=g, norm=n, rope_interleaved=ri, qk=qk, vo=vo)
         for g, n, ri, (qk, vo) in itertools.product(["tensor", "channel"], ["l1", "fro"], [False, True],
                                                      [(True, True), (True, False), (False, True)])]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(str(v) for v in f.values()))
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2), (8, 1)])
def test_op_matches_reference(flags, heads):
    Hq, Hkv = heads
    layers = _layers(3, Hq, Hkv, 8, 32, bias=True, state=True, shadow=True, seed=Hq + Hkv)
    mine, ref = layers, _clone(layers)
    f1 = wops.rescale_attention_(mine, Hq, Hkv, 8, **flags)
    f2 = _reference_call(ref, Hq, Hkv, 8, **flags)
    torch.testing.assert_close(f1, f2, rtol=1e-6, atol=0)
    for a, b in zip(_flat(mine), _flat(ref)):
        _close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("extra", [dict(pow2=True), dict(clamp=(0.5, 1.5)), dict(clamp=(0.9, 1.1), pow2=True)])
def test_op_matches_reference_dtypes_clamp_pow2(dtype, extra):
    layers = _layers(2, 8, 2, 16, 24, dtype=dtype, bias=True, seed=3)
    ref = _clone(layers)
    f1 = wops.rescale_attention_(layers, 8, 2, 16, **extra)
    f2 = _reference_call(ref, 8, 2, 16, **extra)
    torch.testing.assert_close(f1, f2, rtol=1e-6, atol=0)
    for a, b in zip(_flat(layers), _flat(ref)):
        _close(a, b)
    if "clamp" in extra:
        lo, hi = extra["clamp"]
        assert ((f1 >= lo * (1 - 1e-6)) & (f1 <= hi * (1 + 1e-6))).all()
    if extra.get("pow2"):
        assert torch.equal(torch.log2(f1), torch.log2(f1).round())


def test_pow2_scaling_is_bit_exact_and_reversible():
    layers = _layers(2, 8, 2, 16, 24, dtype=torch.bfloat16, seed=4)
    before = [t.clone() for t in _flat(layers)]
    f = wops.rescale_attention_(layers, 8, 2, 16, pow2=True)
    for lay, (s, t) in zip(layers, f.tolist()):  # undo exactly
        lay.wq.div_(s), lay.wk.mul_(s), lay.wv.div_(t), lay.wo.mul_(t)
    for a, b in zip(_flat(layers), before):
        assert torch.equal(a, b)


def test_tensor_mode_balances_the_pairs():
    layers = _layers(3, 8, 2, 16, 32, seed=5)
    wops.rescale_attention_(layers, 8, 2, 16)
    for lay in layers:
        assert math.isclose(lay.wq.abs().sum().item(), lay.wk.abs().sum().item(), rel_tol=1e-5)
        assert math.isclose(lay.wv.abs().sum().item(), lay.wo.abs().sum().item(), rel_tol=1e-5)


def test_deterministic_across_runs_and_thread_counts():
    base = _layers(4, 8, 2, 16, 64, state=True, seed=6)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        layers = _clone(base)
        f = wops.rescale_attention_(layers, 8, 2, 16, granularity="channel")
        runs.append((f, _flat(layers)))
    torch.set_num_threads(2)
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_opcheck():
    layers = _layers(2, 4, 2, 8, 16, bias=True, state=True, seed=7)
    w = [t for lay in layers for t in (lay.wq, lay.wk, lay.wv, lay.wo)]
    b = [t for lay in layers for t in (lay.bq, lay.bk, lay.bv)]
    keys = ("q", "k", "v", "o", "bq", "bk", "bv")
    m = [lay.exp_avg[k] for lay in layers for k in keys]
    v = [lay.exp_avg_sq[k] for lay in layers for k in keys]
    for gran in ("tensor", "channel"):
        torch.library.opcheck(torch.ops.wisca_fast.rescale_attention_.default, (w, b, m, v, [], 4, 2, 8, gran, "l1"))


# --- function preservation on one attention block with RoPE (wisca-method.md Appendix A) -----------

def _rope(x, pos, interleaved):
    D = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos[:, None].double() * inv[None]
    cos, sin = ang.cos(), ang.sin()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
        return out.flatten(-2)
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _block(lay, bo, X, Hq, Hkv, D, interleaved):
    T = X.shape[0]
    q = (X @ lay.wq.T + lay.bq).view(T, Hq, D).transpose(0, 1)
    k = (X @ lay.wk.T + lay.bk).view(T, Hkv, D).transpose(0, 1)
    v = (X @ lay.wv.T + lay.bv).view(T, Hkv, D).transpose(0, 1)
    pos = torch.arange(T)
    q, k = _rope(q, pos, interleaved), _rope(k, pos, interleaved)
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    return (att @ v).transpose(0, 1).reshape(T, Hq * D) @ lay.wo.T + bo


@pytest.mark.parametrize("interleaved", [False, True])
def test_function_preserved_and_negative_controls(interleaved):
    Hq, Hkv, D, C, T = 8, 2, 16, 64, 7
    lay = _layers(1, Hq, Hkv, D, C, dtype=torch.float64, bias=True, seed=8)[0]
    bo = torch.randn(C, dtype=torch.float64)
    X = torch.randn(T, C, dtype=torch.float64)
    Y = _block(lay, bo, X, Hq, Hkv, D, interleaved)
    for gran in ("tensor", "channel"):
        l2 = _clone([lay])[0]
        wops.rescale_attention_([l2], Hq, Hkv, D, granularity=gran, rope_interleaved=interleaved)
        assert (_block(l2, bo, X, Hq, Hkv, D, interleaved) - Y).abs().max() < 1e-12
    # channel factors tied to the wrong RoPE pairing break the equivalence (so this test can fail)
    l3 = _clone([lay])[0]
    wops.rescale_attention_([l3], Hq, Hkv, D, granularity="channel", rope_interleaved=not interleaved)
    assert (_block(l3, bo, X, Hq, Hkv, D, interleaved) - Y).abs().max() > 1e-4
    # leaving the q/k biases unscaled also breaks it
    l4 = _clone([lay])[0]
    bq, bk = l4.bq.clone(), l4.bk.clone()
    wops.rescale_attention_([l4], Hq, Hkv, D)
    l4.bq, l4.bk = bq, bk
    assert (_block(l4, bo, X, Hq, Hkv, D, interleaved) - Y).abs().max() > 1e-4


# --- bad input: clear errors, nothing written --------------------------------------------------------

@pytest.mark.parametrize("mutate, message", [
    (lambda ls: setattr(ls[1], "wk", torch.randn(8, 24)), r"layer 1 W_k must be \[32, 24\]"),
    (lambda ls: setattr(ls[0], "wo", torch.randn(16, 24)), r"layer 0 W_o must be \[24, 64\]"),
    (lambda ls: setattr(ls[1], "wq", ls[1].wq.int()), "must be floating point"),
    (lambda ls: setattr(ls[1], "wv", ls[1].wv.t().contiguous().t()), "must be contiguous"),
    (lambda ls: ls[1].exp_avg.update(q=torch.zeros(3)), "exp_avg of W_q has shape"),
    (lambda ls: ls[1].wo.__setitem__((0, 0), float("nan")), "non-finite values in layer 1"),
    (lambda ls: ls[0].wq.__setitem__((3, 3), float("inf")), "non-finite values in layer 0"),
])
def test_bad_inputs_leave_everything_untouched(mutate, message):
    layers = _layers(2, 4, 2, 16, 24, state=True, seed=9)
    mutate(layers)
    before = [t.clone() for t in _flat(layers)]
    with pytest.raises(ValueError, match=message):
        wops.rescale_attention_(layers, 4, 2, 16)
    for a, b in zip(_flat(layers), before):
        assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all()


def test_bad_arguments():
    layers = _layers(1, 4, 2, 16, 24, seed=10)
    with pytest.raises(ValueError, match="4 query heads do not divide into 3 KV heads"):
        wops.rescale_attention_(layers, 4, 3, 16)
    with pytest.raises(ValueError, match="granularity must be"):
        wops.rescale_attention_(layers, 4, 2, 16, granularity="row")
    with pytest.raises(ValueError, match="norm must be"):
        wops.rescale_attention_(layers, 4, 2, 16, norm="l2")
    with pytest.raises(ValueError, match="clamp must be"):
        wops.rescale_attention_(layers, 4, 2, 16, clamp=(2.0, 1.0))
    with pytest.raises(ValueError, match="even head_dim"):
        wops.rescale_attention_(_layers(1, 4, 2, 15, 24), 4, 2, 15, granularity="channel")


def test_zero_norm_gives_factor_one():
    layers = _layers(1, 4, 2, 8, 16, seed=11)
    layers[0].wk.zero_()
    f = wops.rescale_attention_(layers, 4, 2, 8)
    assert f[0, 0].item() == 1.0 and f[0, 1].item() != 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("flags", FLAGS[::3], ids=lambda f: "-".join(str(v) for v in f.values()))
def test_cuda_kernel_matches_reference(flags):
    layers = _layers(3, 8, 2, 16, 40, bias=True, state=True, shadow=True, seed=12)
    ref = _clone(layers)
    gpu = _clone(layers)
    for lay in gpu:
        for name in ("wq", "wk", "wv", "wo", "bq", "bk", "bv"):
            setattr(lay, name, getattr(lay, name).cuda())
        for d in (lay.exp_avg, lay.exp_avg_sq, lay.shadows):
            for k in d:
                d[k] = d[k].cuda()
    f1 = wops.rescale_attention_(gpu, 8, 2, 16, **flags)
    f2 = _reference_call(ref, 8, 2, 16, **flags)
    torch.testing.assert_close(f1.cpu(), f2, rtol=1e-6, atol=0)
    for a, b in zip(_flat(gpu), _flat(ref)):
        _close(a.cpu(), b)
    again = _clone(layers)
    for lay in again:
        lay.wq, lay.wk, lay.wv, lay.wo = (t.cuda() for t in (lay.wq, lay.wk, lay.wv, lay.wo))
        lay.bq = lay.bk = lay.bv = None
        lay.exp_avg, lay.exp_avg_sq, lay.shadows = {}, {}, {}
    twice = [wops.rescale_attention_(_clone(again), 8, 2, 16, **flags) for _ in range(2)]
    assert torch.equal(twice[0], twice[1])  # deterministic


def test_op_lists_layout_round_trips():
    """layout.OpLists is the one statement of the op's 4L/3L/7L/4L lists: packing per-layer tensors and
    reading a layer back gives the same tensors, absent entries stay absent."""
    from wisca_fast.layout import MOMENTS, OpLists

    layers = _layers(3, 8, 2, 4, 16, bias=True, state=True)
    layers[1].bk = None
    for lay, key in ((layers[1], "bk"), (layers[2], "v")):
        lay.exp_avg.pop(key), lay.exp_avg_sq.pop(key)
    lists = OpLists.pack(layers)
    assert (len(lists.weights), len(lists.biases), len(lists.exp_avg), len(lists.shadows)) == (12, 9, 21, 0)
    for l, lay in enumerate(layers):
        back = lists.layer(l)
        assert all(a is b for a, b in zip(back.weights, lay.weights))
        assert all((a is None and b is None) or a is b for a, b in zip(back.biases, lay.biases))
        assert set(back.exp_avg) == set(lay.exp_avg) and all(back.exp_avg[k] is lay.exp_avg[k] for k in lay.exp_avg)
        assert set(back.exp_avg) <= set(MOMENTS) and not back.shadows
