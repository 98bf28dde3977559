"""c2t_fast::skinny_linear (C++ CPU, AVX2/FMA micro-kernel) against its float64 reference, opcheck,
autograd, bad inputs; and the routing beside it (``kernels.skinny_linear``), which routes a target's linear layers through it."""

import copy

import pytest
import torch
import torch.nn.functional as F

from c2t_fast import SpeculativeGenerator, reference
from c2t_fast.decoding.drafts import DraftLM
from c2t_fast.decoding.strategies import Chain, Eagle2
from c2t_fast.kernels import ops
from c2t_fast.kernels import skinny_linear as skinny_family
from c2t_fast.kernels.skinny_linear import fast_linear_installed, install_fast_linear, remove_fast_linear, stock_linear
from support import tiny_causal_lm

OP = torch.ops.c2t_fast.skinny_linear

# every tile remainder: M % 3 in {0, 1, 2}, N % 4 in {0..3}, K % 8 in {0..7}; the target's own shapes
SHAPES = [(M, K, N) for M in (1, 2, 3, 4, 5, 16, 17, 64, 65) for K, N in ((1, 1), (7, 5), (8, 4), (13, 6), (64, 33))]
SHAPES += [(1, 576, 576), (16, 576, 1536), (5, 1536, 576), (2, 576, 49152 // 64 + 3)]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_reference(M, K, N, with_bias):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if with_bias else None
    out = OP(x, w, b)
    torch.testing.assert_close(out, reference.skinny_linear(x, w, b), rtol=1e-5, atol=2e-6 * K)


@pytest.mark.parametrize("M,K,N", [(1, 9, 7), (7, 40, 13), (64, 577, 9), (70, 16, 4)])
def test_every_output_element_is_written_exactly(M, K, N):
    """Small integers make every fp32 sum exact in any order: an element the kernel skipped (its
    output comes from an uninitialised buffer) or misplaced cannot match."""
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randint(-4, 5, (M, K), generator=g).float()
    w = torch.randint(-4, 5, (N, K), generator=g).float()
    b = torch.randint(-4, 5, (N,), generator=g).float()
    for _ in range(3):  # fresh, unzeroed outputs each time
        assert torch.equal(OP(x, w, b), reference.skinny_linear(x, w, b))


def test_strided_rows_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    wide, w = torch.randn(6, 40, generator=g), torch.randn(11, 17, generator=g)
    x = wide[:, 3:20]  # row stride 40, unit stride along K
    torch.testing.assert_close(OP(x, w), reference.skinny_linear(x.contiguous(), w), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 17, generator=g)
    y = ops.skinny_linear(x3, w)
    assert y.shape == (2, 3, 11)
    torch.testing.assert_close(y, F.linear(x3, w), rtol=1e-5, atol=1e-5)
    xt = torch.randn(17, 3, generator=g).T  # stride along K is 3: the wrapper copies, the op refuses
    torch.testing.assert_close(ops.skinny_linear(xt, w), F.linear(xt, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x must have unit stride"):
        OP(xt, w)


def test_empty_and_non_finite():
    w = torch.randn(5, 8)
    assert OP(torch.zeros(0, 8), w).shape == (0, 5)
    assert OP(torch.zeros(3, 8), torch.zeros(0, 8)).shape == (3, 0)
    b = torch.randn(5)
    torch.testing.assert_close(OP(torch.zeros(2, 0), torch.zeros(5, 0), b), b.expand(2, 5))
    assert torch.equal(OP(torch.zeros(2, 0), torch.zeros(5, 0)), torch.zeros(2, 5))
    x = torch.randn(4, 8)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    out, want = OP(x, w), F.linear(x, w)
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isinf(out), torch.isinf(want))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 3]]).all()


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 4).double(), torch.randn(3, 4), None), "x must be float32"),
    ((torch.randn(4), torch.randn(3, 4), None), r"x must be float32 \[M, K\]"),
    ((torch.randn(2, 4), torch.randn(3, 4).half(), None), "weight must be float32"),
    ((torch.randn(2, 4), torch.randn(3, 5), None), "weight must be"),
    ((torch.randn(2, 4), torch.randn(4, 3).T, None), "weight must be contiguous"),
    ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), "bias must be"),
    ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(3).double()), "bias must be"),
    ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 3)), "bias must be"),
])
def test_bad_inputs_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        OP(*args)


def test_wrapper_refuses_a_non_tensor():
    with pytest.raises(ValueError, match="x must be a tensor"):
        ops.skinny_linear([1.0, 2.0], torch.randn(3, 2))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 12, generator=g), torch.randn(7, 12, generator=g)
    b = torch.randn(7, generator=g) if with_bias else None
    torch.library.opcheck(OP.default, (x, w, b))
    torch.library.opcheck(OP.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_() if with_bias else b))


def test_gradients_match_f_linear():
    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(s, generator=g, requires_grad=True) for s in ((6, 10), (9, 10), (9,)))
    gy = torch.randn(6, 9, generator=g)
    grads = torch.autograd.grad(OP(x, w, b), (x, w, b), gy)
    want = torch.autograd.grad(F.linear(x, w, b), (x, w, b), gy)
    for a, e in zip(grads, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_compiles_with_fullgraph():
    x, w = torch.randn(3, 16), torch.randn(5, 16)
    f = torch.compile(lambda a, b: OP(a, b) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, w), 2 * F.linear(x, w), rtol=1e-5, atol=1e-5)


# --- routing a model's linear layers -----------------------------------------------------------


def _count_calls(monkeypatch):
    calls = []
    real = ops.skinny_linear

    def spy(x, w, b=None):
        calls.append(x.shape)
        return real(x, w, b)

    monkeypatch.setattr(skinny_family, "skinny_linear", spy)  # the routing's own binding
    return calls


def test_install_routes_few_row_calls_and_keeps_outputs(monkeypatch):
    model = tiny_causal_lm("llama", 6, 2, seed=1)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    n = install_fast_linear(model)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) and fast_linear_installed(model)
    assert install_fast_linear(model) == n  # idempotent
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
    assert len(calls) == n  # every linear of one forward went through the kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, ops.SKINNY_MAX_ROWS + 1)))
    assert not calls  # too many rows: torch's GEMM
    assert remove_fast_linear(model) == n and not fast_linear_installed(model)
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    assert not calls


def test_training_keeps_torch_linear_and_its_gradients(monkeypatch):
    model = tiny_causal_lm("qwen2", 6, 2, seed=1)
    twin = copy.deepcopy(model)
    install_fast_linear(model)
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    twin(ids, labels=ids).loss.backward()
    assert not calls
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_deepcopy_routes_the_copy_and_weight_updates_are_seen():
    model = tiny_causal_lm("mistral", 6, 2, seed=1)
    install_fast_linear(model)
    twin = copy.deepcopy(model)
    assert fast_linear_installed(twin)
    head = twin.get_output_embeddings()
    assert head.forward.__self__ is head  # bound to the copy, not to the original layer
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        ids = torch.arange(5)[None]
        ref = copy.deepcopy(twin)
        remove_fast_linear(ref)
        torch.testing.assert_close(twin(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(twin(ids).logits, model(ids).logits)


def test_stock_linear_context_restores_the_routing(monkeypatch):
    model = tiny_causal_lm("llama", 6, 2, seed=1)
    install_fast_linear(model)
    calls = _count_calls(monkeypatch)
    with stock_linear(model), torch.no_grad():
        assert not fast_linear_installed(model)
        model(torch.arange(4)[None])
    assert not calls and fast_linear_installed(model)


def test_other_dtypes_and_bad_model_are_left_alone():
    model = tiny_causal_lm("llama", 6, 2, seed=1).to(torch.float64)
    assert install_fast_linear(model) == 0 and not fast_linear_installed(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        install_fast_linear("llama")


@pytest.mark.parametrize("strategy", [Chain(4), Eagle2(top_k=4, depth=3, total_tokens=20)])
def test_engine_on_a_routed_target_is_lossless(strategy):
    """Greedy output equals the routed target's own greedy output (the target the engine speeds up)."""
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    install_fast_linear(target)
    prompt = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(0))
    gen = SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), strategy, eos_token_id=[], budget=None, ngram=None)
    out = gen.generate(prompt, max_new_tokens=30)
    ref = target.generate(prompt[None], do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    assert out.tokens == ref[0, 12:].tolist()


def test_portable_loop_matches_and_says_so_once():
    """The loop for CPUs without AVX2/FMA, forced on this one in a fresh interpreter."""
    import os
    import subprocess
    import sys

    code = ("import torch, c2t_fast\n"
            "from c2t_fast import reference\n"
            "for M, K, N in ((1, 7, 5), (17, 64, 33), (4, 576, 9)):\n"
            "    g = torch.Generator().manual_seed(M)\n"
            "    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)\n"
            "    torch.testing.assert_close(torch.ops.c2t_fast.skinny_linear(x, w, b),\n"
            "                               reference.skinny_linear(x, w, b), rtol=1e-5, atol=2e-6 * K)\n"
            "print('portable ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "C2T_FAST_SKINNY_PORTABLE": "1"})
    assert proc.returncode == 0 and "portable ok" in proc.stdout, proc.stdout + proc.stderr
    # the C++ warning goes to stderr, once per process
    assert proc.stderr.count("running its portable loop (C2T_FAST_SKINNY_PORTABLE=1)") == 1, proc.stderr
