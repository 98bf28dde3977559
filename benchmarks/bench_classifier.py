"""Per-layer C2T scoring on the CPU: the fused op (with the torch.topk it takes as input) vs the
unfused torch sequence (log_softmax, topk, entropy, MLP, sigmoid). V = 49152 (SmolLM2), M = 1000,
K = 15, h = 48.

Run: pytest benchmarks/bench_classifier.py --benchmark-enable --benchmark-json=clf.json
"""

import pytest
import torch

from c2t_fast import ops

V, M, K, H = 49152, 1000, 15, 48


def _inputs(n):
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(n, V, generator=gen) * 3
    parent = -torch.rand(n, generator=gen)
    w = (torch.randn(H, 3, generator=gen), torch.randn(H, generator=gen), torch.randn(1, H, generator=gen),
         torch.randn(1, generator=gen))
    return logits, parent, w


def fused(logits, parent, w):
    tv, ti = torch.topk(logits, M)
    return ops.score_children(logits, tv, ti, parent, 3, K, w, 0.5)


def _unfused_tail(top_lp, top_i, parent, w):
    p = top_lp.exp()
    entropy = -(p * top_lp).nan_to_num().sum(-1)
    child = parent[:, None] + top_lp[:, :K]
    feats = torch.stack([child.exp(), entropy[:, None].expand_as(child), torch.full_like(child, 3.0)], -1)
    conf = torch.sigmoid(torch.relu(feats @ w[0].T + w[1]) @ w[2].T + w[3])[..., 0]
    return conf, conf >= 0.5, top_i[:, :K], child, entropy


def unfused(logits, parent, w):
    top_lp, top_i = torch.topk(torch.log_softmax(logits.float(), -1), M)
    return _unfused_tail(top_lp, top_i, parent, w)


IMPLS = {"fused": fused, "unfused_torch": unfused}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 15, 150])
def bench_score_children_cpu(benchmark, impl, n):
    args = _inputs(n)
    a, b = fused(*args), unfused(*args)
    torch.testing.assert_close(a.confidence, b[0], rtol=1e-4, atol=1e-5)
    benchmark.group = f"score_children n={n} V={V} M={M} K={K}"
    benchmark(IMPLS[impl], *args)


def fused_after_topk(logits, parent, w, tv, ti):
    return ops.score_children(logits, tv, ti, parent, 3, K, w, 0.5)


def unfused_after_topk(logits, parent, w, tv, ti):
    """The unfused sequence minus its topk (given the same top-M indices)."""
    return _unfused_tail(torch.log_softmax(logits.float(), -1).gather(-1, ti), ti, parent, w)


AFTER_TOPK = {"fused": fused_after_topk, "unfused_torch": unfused_after_topk}


@pytest.mark.parametrize("impl", AFTER_TOPK)
@pytest.mark.parametrize("n", [1, 15, 150])
def bench_score_children_after_topk_cpu(benchmark, impl, n):
    """The part that differs: both sides get the same torch.topk result."""
    logits, parent, w = _inputs(n)
    tv, ti = torch.topk(logits, M)
    benchmark.group = f"score_children after topk, n={n}"
    benchmark(AFTER_TOPK[impl], logits, parent, w, tv, ti)
