"""c2t_fast::decode_attention (C++ CPU kernel) against its pure-torch reference: fresh random inputs over
many shapes, cache precisions and lengths, cache rows past each length poisoned, strided layer views of a
static cache, NaN/inf propagation, the portable loop, batch invariance, opcheck and bad arguments."""

import math
import os
import subprocess
import sys

import pytest
import torch

from c2t_fast.kernels import ops, reference

OP = torch.ops.c2t_fast.decode_attention
SHAPES = [  # B, Hq, Hkv, C, D
    (1, 1, 1, 1, 8), (3, 9, 3, 50, 64), (2, 4, 4, 7, 8), (5, 8, 2, 100, 128), (3, 16, 1, 33, 24),
    (2, 7, 7, 5, 40), (2, 12, 3, 9, 256), (4, 6, 2, 130, 64), (2, 2, 1, 17, 3),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(B, Hq, Hkv, C, D, kv_dtype, q_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(q_dtype)
    k = torch.randn(B, Hkv, C, D, generator=g).to(kv_dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(kv_dtype)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    return q, k, v, lengths


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_with_rows_past_each_length_poisoned(shape, kv_dtype):
    for seed in range(3):
        q, k, v, lengths = _case(*shape, kv_dtype, seed=seed)
        for b, n in enumerate(lengths.tolist()):  # what lies past a row's length must never be read
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("inf")
        out = ops.decode_attention(q, k, v, lengths)
        want = reference.decode_attention(q, k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0), lengths,
                                          shape[4] ** -0.5)
        assert out.dtype == q.dtype and out.shape == q.shape
        torch.testing.assert_close(out, want, **_tol(torch.float32))


@pytest.mark.parametrize("q_dtype", DTYPES)
def test_query_dtype_and_scale(q_dtype):
    q, k, v, lengths = _case(3, 6, 2, 20, 64, torch.float16, q_dtype)
    out = ops.decode_attention(q, k, v, lengths, scale=0.3)
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.float(), reference.decode_attention(q, k, v, lengths, 0.3).float(), **_tol(q_dtype))


def test_layer_view_of_a_static_cache():
    """The static-batch LM passes ``cache[layer]`` of ``[layers, B, Hkv, C, D]``, and slot slices of it."""
    cache_k = torch.randn(3, 4, 2, 40, 64)
    cache_v = torch.randn(3, 4, 2, 40, 64)
    q = torch.randn(2, 6, 64)
    lengths = torch.tensor([40, 7])
    k, v = cache_k[1, 1:3], cache_v[1, 1:3]
    assert not k.is_contiguous() or k.storage_offset()
    torch.testing.assert_close(ops.decode_attention(q, k, v, lengths),
                               reference.decode_attention(q, k.contiguous(), v.contiguous(), lengths, 0.125))


def test_nan_and_inf_propagate_as_torch_softmax_does():
    q, k, v, lengths = _case(4, 4, 2, 12, 16, torch.float32)
    lengths[:] = 12
    k[0, 0, 3, 0] = float("nan")  # a NaN score: the heads reading KV head 0 of row 0 are NaN
    q[1, 2, :] = float("inf")  # a +inf maximum: NaN
    k[2, 1, :, :] = -1e30  # huge but finite scores: still a proper softmax
    out = ops.decode_attention(q, k, v, lengths)
    want = reference.decode_attention(q, k, v, lengths, 0.25)
    torch.testing.assert_close(out, want, equal_nan=True)
    assert out[0, :2].isnan().all() and out[1, 2].isnan().all() and out[3].isfinite().all()


def test_a_row_does_not_depend_on_the_others():
    """Batch invariance, bit for bit: the generator's resumed runs rely on it."""
    q, k, v, lengths = _case(6, 9, 3, 64, 64, torch.float16)
    full = ops.decode_attention(q, k, v, lengths)
    for b in range(6):
        other = _case(6, 9, 3, 64, 64, torch.float16, seed=b + 10)
        q2, k2, v2, l2 = (x.clone() for x in other)
        q2[b], k2[b], v2[b], l2[b] = q[b], k[b], v[b], lengths[b]
        assert torch.equal(ops.decode_attention(q2, k2, v2, l2)[b], full[b])


def test_portable_loop_matches_in_a_subprocess():
    code = ("import torch; from c2t_fast.kernels import ops, reference\n"
            "torch.manual_seed(0)\n"
            "for D in (8, 64, 12):\n"
            "  q=torch.randn(3,6,D); k=torch.randn(3,2,30,D).half(); v=torch.randn(3,2,30,D).half(); L=torch.tensor([30,1,17])\n"
            "  torch.testing.assert_close(ops.decode_attention(q,k,v,L), reference.decode_attention(q,k,v,L,D**-0.5))\n"
            "print('ok')\n")
    env = {**os.environ, "C2T_FAST_DECODE_PORTABLE": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert "portable loop" in r.stderr


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_opcheck(kv_dtype):
    q, k, v, lengths = _case(3, 6, 3, 10, 16, kv_dtype)
    torch.library.opcheck(OP.default, (q, k, v, lengths, 0.25))


@pytest.mark.parametrize("case, name", [
    (lambda q, k, v, L: (q[0], k, v, L), "q"),
    (lambda q, k, v, L: (q, k[..., :8], v, L), "k"),
    (lambda q, k, v, L: (q, k, v.double(), L), "v"),
    (lambda q, k, v, L: (q, k, v, L.int()), "lengths"),
    (lambda q, k, v, L: (q, k, v, L[:1]), "lengths"),
    (lambda q, k, v, L: (q, k, v, L * 0), "lengths"),
    (lambda q, k, v, L: (q, k, v, L + 100), "lengths"),
    (lambda q, k, v, L: (q.int(), k, v, L), "q"),
    (lambda q, k, v, L: (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, L), "stride"),
    (lambda q, k, v, L: (q[:, :5], k, v, L), "Hq"),
])
def test_bad_arguments_are_refused_by_name(case, name):
    q, k, v, lengths = _case(2, 6, 3, 10, 16, torch.float32)
    args = case(q, k, v, lengths)
    with pytest.raises(ValueError, match=name):
        ops.decode_attention(*args)
    with pytest.raises(ValueError, match=name):  # the raw op, past the Python checks
        OP(*args, 0.25)


def test_non_finite_scale_refused():
    q, k, v, lengths = _case(2, 6, 3, 10, 16, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        ops.decode_attention(q, k, v, lengths, scale=math.inf)


def test_empty_batch():
    q, k, v, lengths = _case(1, 4, 2, 5, 8, torch.float32)
    out = ops.decode_attention(q[:0], k[:0], v[:0], lengths[:0])
    assert out.shape == (0, 4, 8)
