"""c2t_fast::tree_attention: the CPU path and the Triton kernel (interpreter) against the dense
reference, opcheck, torch.compile, bad inputs."""

import pytest
import torch

import c2t_fast
from c2t_fast import reference as ref
from c2t_fast.kernels import tree_attention as tree_attention_family
from c2t_fast.kernels.triton.tree_attention import tree_attention as triton_tree_attention
from support import random_parents

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _case(B, Hq, Hkv, T, D, P, dtype, seed, layout="contiguous", per_row=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype)
    S = P + T
    if layout == "contiguous":
        k, v = (torch.randn(B, Hkv, S, D, generator=gen).to(dtype) for _ in range(2))
    elif layout == "sliced":  # a view into a longer preallocated cache
        k, v = (torch.randn(B, Hkv, S + 11, D, generator=gen).to(dtype)[:, :, :S] for _ in range(2))
    else:  # [B, S, H, D] storage
        k, v = (torch.randn(B, S, Hkv, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    bits = torch.stack([c2t_fast.build_tree(random_parents(T, "random", gen)).ancestor_bits for _ in range(B)])
    if not per_row:
        bits = bits[0]
    return q, k, v, bits


GRID = [  # (B, Hq, Hkv, T, D, P): every GQA ratio, head dim and multi-word tree appears
    (1, 4, 4, 1, 64, 0), (1, 9, 3, 16, 64, 37), (2, 8, 2, 5, 80, 130), (1, 8, 1, 64, 96, 70),
    (1, 2, 2, 65, 128, 200), (2, 16, 2, 7, 256, 19), (1, 3, 1, 128, 64, 10), (1, 6, 2, 33, 128, 300),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GRID)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "bshd"])
@pytest.mark.parametrize("single_pass", [True, False])
def test_cpu_path_matches_reference(shape, dtype, layout, single_pass, poison):
    B, Hq, Hkv, T, D, P = shape
    for seed in range(2):
        q, k, v, bits = _case(B, Hq, Hkv, T, D, P, dtype, seed, layout, per_row=seed == 1)
        poison("cpu")
        out = tree_attention_family._tree_attention_cpu(q, k, v, bits, P, D ** -0.5, single_pass=single_pass)
        want = ref.tree_attention(q, k, v, bits, P, D ** -0.5)
        assert out.shape == (B, T, Hq, D) and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.float(), want.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GRID[:6])
def test_triton_kernel_matches_reference(shape, dtype, poison):
    """Runs through TRITON_INTERPRET=1 on CPU; on a GPU run it is the compiled kernel."""
    B, Hq, Hkv, T, D, P = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, bits = (t.to(device) for t in _case(B, Hq, Hkv, T, D, P, dtype, 3, "sliced", per_row=True))
    for splits in (None, 2):
        poison(device)
        out = triton_tree_attention(q, k, v, bits, P, 0.3, num_prefix_splits=splits)
        want = ref.tree_attention(q, k, v, bits, P, 0.3)
        torch.testing.assert_close(out.float(), want.float(), rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_per_row_node_counts():
    """Row 1 has a 4-node tree padded to T = 7: its real nodes ignore the padding slots."""
    gen = torch.Generator().manual_seed(5)
    B, H, T, D, P = 2, 4, 7, 64, 20
    q, k, v = torch.randn(B, H, T, D, generator=gen), torch.randn(B, 2, P + T, D, generator=gen), None
    v = torch.randn(B, 2, P + T, D, generator=gen)
    small = c2t_fast.build_tree(torch.tensor([-1, 0, 0, 1], dtype=torch.int32)).ancestor_bits  # [4, 1]
    full = c2t_fast.build_tree(random_parents(T, "random", gen)).ancestor_bits
    pad = torch.tensor([[1 << i] for i in range(4, T)])  # padding nodes: only themselves
    bits = torch.stack([full, torch.cat([small, pad])])
    out = c2t_fast.tree_attention(q, k, v, bits, P)
    alone = ref.tree_attention(q[1:, :, :4], k[1:, :, :P + 4], v[1:, :, :P + 4], small, P, D ** -0.5)
    torch.testing.assert_close(out[1:, :4], alone, rtol=2e-5, atol=2e-5)


def test_opcheck_and_compile():
    q, k, v, bits = _case(1, 6, 2, 9, 64, 30, torch.float32, 0)
    torch.library.opcheck(torch.ops.c2t_fast.tree_attention.default, (q, k, v, bits, 30, 0.125))

    @torch.compile(fullgraph=True)
    def layer(q, k, v, bits):
        return torch.ops.c2t_fast.tree_attention(q * 2, k, v, bits, 30, 0.125).sum(-1)

    torch.testing.assert_close(layer(q, k, v, bits),
                               ref.tree_attention(q * 2, k, v, bits, 30, 0.125).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "q": a["q"][0]}, "must be 4-D"),
        (lambda a: {**a, "q": torch.randn(1, 5, 9, 64)}, "5 query heads do not divide into 2 KV heads"),
        (lambda a: {**a, "prefix_len": 29}, "prefix_len \\+ T"),
        (lambda a: {**a, "k": a["k"].half()}, "must share one of"),
        (lambda a: {**a, "bits": a["bits"][:5]}, "ancestor_bits must be int64"),
        (lambda a: {**a, "bits": a["bits"].int()}, "ancestor_bits must be int64"),
        (lambda a: {**a, "v": a["v"][:, :, :-1]}, "differ in shape"),
        (lambda a: {**a, "q": torch.randn(1, 6, 9, 320), "k": torch.randn(1, 2, 39, 320),
                    "v": torch.randn(1, 2, 39, 320)}, "head dim 320"),
        (lambda a: {**a, "q": a["q"].to(torch.int64)}, "must share one of"),
    ],
)
def test_bad_inputs(mutate, message):
    q, k, v, bits = _case(1, 6, 2, 9, 64, 30, torch.float32, 0)
    a = mutate(dict(q=q, k=k, v=v, bits=bits, prefix_len=30))
    with pytest.raises(ValueError, match=message):
        c2t_fast.tree_attention(a["q"], a["k"], a["v"], a["bits"], a["prefix_len"])


def test_too_many_nodes():
    T = c2t_fast.ops.MAX_TREE_NODES + 1
    q = torch.randn(1, 1, T, 8)
    kv = torch.randn(1, 1, T, 8)
    bits = torch.zeros(T, (T + 63) // 64, dtype=torch.int64)
    with pytest.raises(ValueError, match="outside the supported"):
        c2t_fast.tree_attention(q, kv, kv, bits, 0)


def test_device_mismatch_is_an_error_on_any_machine():
    q, k, v, bits = _case(1, 6, 2, 9, 64, 30, torch.float32, 0)
    with pytest.raises(ValueError, match="one device"):
        c2t_fast.tree_attention(q, k, v, bits.to("meta"), 30)


@pytest.mark.gpu
def test_device_mismatch_is_an_error():
    q, k, v, bits = _case(1, 6, 2, 9, 64, 30, torch.float32, 0)
    with pytest.raises(ValueError, match="one device"):
        c2t_fast.tree_attention(q.cuda(), k.cuda(), v.cuda(), bits, 30)


def test_cpu_mask_cache_follows_the_bits_tensor():
    """The CPU path reuses its mask only for the very same, unmodified bits tensor."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(1, 4, 6, 64, generator=gen), torch.randn(1, 2, 26, 64, generator=gen), None
    v = torch.randn(1, 2, 26, 64, generator=gen)
    bits_a = c2t_fast.build_tree(torch.tensor([-1, 0, 1, 2, 3, 4], dtype=torch.int32)).ancestor_bits
    bits_b = c2t_fast.build_tree(torch.tensor([-1, 0, 0, 0, 0, 0], dtype=torch.int32)).ancestor_bits
    for bits in (bits_a, bits_a, bits_b):
        torch.testing.assert_close(c2t_fast.tree_attention(q, k, v, bits, 20),
                                   ref.tree_attention(q, k, v, bits, 20, 0.125), rtol=1e-5, atol=1e-5)
    bits_b.copy_(bits_a)  # same object, new contents
    torch.testing.assert_close(c2t_fast.tree_attention(q, k, v, bits_b, 20),
                               ref.tree_attention(q, k, v, bits_a, 20, 0.125), rtol=1e-5, atol=1e-5)
