"""Bad inputs to the tree ops: each gets a clear ValueError and nothing is written."""

import logging

import pytest
import torch

import c2t_fast
from c2t_fast import ops as c2t_ops
from c2t_fast import reference as ref
from c2t_fast.kernels import library, tree_ops

I32 = torch.int32


def p32(*xs):
    return torch.tensor(xs, dtype=I32)


@pytest.mark.parametrize(
    "parents, message",
    [
        (p32(0, 0, 1), r"node 0 must be the root"),
        (p32(-1, 0, 3, 1), r"parents\[2\] = 3 is invalid"),  # child before parent
        (p32(-1, 1), r"parents\[1\] = 1 is invalid"),  # self loop (a cycle)
        (p32(-1, 0, 7), r"parents\[2\] = 7 is invalid"),  # out of range
        (p32(-1, -1), r"parents\[1\] = -1 is invalid"),  # a second root
        (p32(), r"at least the root"),
    ],
)
def test_build_tree_rejects_bad_parents(parents, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.c2t_fast.build_tree(parents, 0)
    with pytest.raises(ValueError, match=message):
        ref.build_tree(parents, 0)


def test_build_tree_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be 1-D"):
        torch.ops.c2t_fast.build_tree(p32(-1, 0).view(1, 2), 0)
    with pytest.raises(ValueError, match="must be Int"):
        torch.ops.c2t_fast.build_tree(torch.tensor([-1.0, 0.0]), 0)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        torch.ops.c2t_fast.build_tree(p32(-1, 0), -3)
    with pytest.raises(ValueError, match="integer tensor"):
        c2t_fast.build_tree(torch.tensor([-1.0, 0.0]))


def _tree():
    return c2t_fast.Tree(torch.tensor([1, 2, 3]), p32(-1, 0, 0), torch.tensor([0.0, -1.0, -2.0]))


def test_prune_tree_errors():
    t = _tree()
    good = dict(cand_parent=torch.tensor([0, 2]), cand_token=torch.tensor([5, 6]),
                cand_logp=torch.tensor([-1.0, -2.0]), cand_conf=torch.tensor([0.5, 0.6]),
                cand_keep=torch.tensor([True, True]))
    c2t_fast.prune_tree(t, **good, max_keep=1)
    with pytest.raises(ValueError, match=r"cand_parent\[1\] = 3 is not a node of the 3-node tree"):
        c2t_fast.prune_tree(t, **{**good, "cand_parent": torch.tensor([0, 3])}, max_keep=1)
    with pytest.raises(ValueError, match="all candidate arrays need 2 entries"):
        c2t_fast.prune_tree(t, **{**good, "cand_conf": torch.tensor([0.5])}, max_keep=1)
    with pytest.raises(ValueError, match="cand_keep must be Bool"):
        c2t_fast.prune_tree(t, **{**good, "cand_keep": torch.tensor([1, 0])}, max_keep=1)
    with pytest.raises(ValueError, match="cand_conf must be Float"):
        c2t_fast.prune_tree(t, **{**good, "cand_conf": torch.tensor([0.5, 0.6], dtype=torch.float64)}, max_keep=1)
    bad_tree = c2t_fast.Tree(t.tokens, p32(-1, 2, 0), t.logp)
    with pytest.raises(ValueError, match=r"parents\[1\] = 2 is invalid"):
        c2t_fast.prune_tree(bad_tree, **good, max_keep=1)


def test_rerank_tree_errors():
    t = _tree()
    with pytest.raises(ValueError, match="total_tokens counts the root"):
        c2t_fast.rerank_tree(t, 0)
    with pytest.raises(ValueError, match="logp has 2 entries for 3 nodes"):
        c2t_fast.rerank_tree(c2t_fast.Tree(t.tokens, t.parents, t.logp[:2]), 2)
    with pytest.raises(ValueError, match="tokens has 3 nodes but parents has 2"):
        c2t_fast.rerank_tree(c2t_fast.Tree(t.tokens, t.parents[:2], t.logp), 2)


def test_verify_errors():
    tokens, parents = torch.tensor([1, 2, 3]), p32(-1, 0, 0)
    with pytest.raises(ValueError, match=r"target logits must be \[T, V\] with T = 3"):
        c2t_fast.verify_greedy(tokens, parents, torch.randn(2, 5))
    with pytest.raises(ValueError, match="target argmax has 2 entries for 3 nodes"):
        c2t_fast.verify_greedy(tokens, parents, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="int64 argmax ids"):
        c2t_fast.verify_greedy(tokens, parents, torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="tokens must be Long"):
        c2t_fast.verify_greedy(tokens.to(I32), parents, torch.randn(3, 4))
    probs = torch.softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError, match=r"tokens\[2\] = 3 is outside the vocabulary of size 3"):
        c2t_fast.verify_sample(tokens, parents, probs[:, :3])
    with pytest.raises(ValueError, match="uniforms needs one draw per node"):
        c2t_fast.verify_sample(tokens, parents, probs, torch.rand(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="uniforms must be Double"):
        c2t_fast.verify_sample(tokens, parents, probs, torch.rand(3))


@pytest.mark.parametrize(
    "mutate, accepted, message",
    [
        (None, [0, 3, 2], "strictly increasing"),
        (None, [0, 23], r"accepted\[1\] = 23 points outside"),
        (None, [-1, 2], r"accepted\[0\] = -1 points outside"),
        ("shape", [0, 1], "has shape"),
        ("dtype", [0, 1], "is Half but caches\\[0\\] is Float"),
        ("stride", [0, 1], "contiguous in the head dimension"),
    ],
)
def test_compact_kv_rejects_bad_input_and_writes_nothing(mutate, accepted, message):
    caches = [torch.randn(1, 2, 30, 8) for _ in range(4)]
    if mutate == "shape":
        caches[2] = torch.randn(1, 2, 31, 8)
    elif mutate == "dtype":
        caches[3] = caches[3].half()
    elif mutate == "stride":
        caches[1] = torch.randn(1, 2, 8, 30).transpose(2, 3)
    before = [c.clone() for c in caches]
    with pytest.raises(ValueError, match=message):
        c2t_fast.compact_kv(caches, 7, torch.tensor(accepted))
    for c, b in zip(caches, before):
        assert torch.equal(c, b)


def test_compact_kv_rejects_bad_prefix_and_empty_list():
    with pytest.raises(ValueError, match="prefix_len 40 is outside the cache length 30"):
        c2t_fast.compact_kv([torch.randn(1, 1, 30, 4)], 40, torch.tensor([0]))
    with pytest.raises(ValueError, match="caches is empty"):
        c2t_fast.compact_kv([], 0, torch.tensor([0]))
    with pytest.raises(ValueError, match="caches must be"):
        c2t_fast.compact_kv([torch.randn(2, 30, 4)], 0, torch.tensor([0]))


def test_cuda_fallback_is_explicit_and_logged_once(caplog):
    """A CPU-only build serves CUDA tensors with the reference and says so once per op. The wrapper
    is exercised on CPU tensors here; which ops got it is recorded at import."""
    if c2t_ops.cuda_kernels_compiled():
        pytest.skip("this build has the CUDA kernels; no fallback is registered")
    assert not any(c2t_ops.has_cuda_kernel(n) for n in library.TREE_OPS)
    run = tree_ops._fallback("build_tree")
    library._warned.discard("build_tree")
    with caplog.at_level(logging.WARNING, logger="c2t_fast"):
        out1 = run(p32(-1, 0, 0), 3)
        run(p32(-1, 0), 3)
    warnings = [r for r in caplog.records if "no compiled CUDA kernel" in r.message]
    assert len(warnings) == 1 and "build_tree" in warnings[0].message
    assert torch.equal(out1[1], ref.build_tree(p32(-1, 0, 0), 3)[1])
    assert "CUDA" in torch._C._dispatch_dump("c2t_fast::build_tree")
