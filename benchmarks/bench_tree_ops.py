"""Tree ops on the CPU: compiled kernels vs the pure-torch references (pytest-benchmark).

Run: pytest benchmarks/bench_tree_ops.py --benchmark-enable --benchmark-json=bench.json
then: python benchmarks/report.py bench.json
(Under the plain test command every benchmark runs once as a smoke test.)
"""

import pytest
import torch

from c2t_fast import reference as ref
from support import random_parents

torch.set_num_threads(max(1, torch.get_num_threads()))
OPS = torch.ops.c2t_fast
IMPLS = {"kernel": OPS, "reference": ref}

# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; fp32 cache on the CPU.
LAYERS, HKV, D = 30, 3, 64


def _tree(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    parents = random_parents(T, "wide", gen)
    tokens = torch.randint(0, 49152, (T,), generator=gen)
    step = -torch.rand(T, generator=gen) * 3
    logp = torch.zeros(T)
    for i in range(1, T):
        logp[i] = logp[parents[i]] + step[i]
    return tokens, parents, logp, gen


def _group(op, T):
    return f"{op} T={T}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [16, 64, 256])
def bench_build_tree(benchmark, impl, T):
    _, parents, _, _ = _tree(T)
    benchmark.group = _group("build_tree", T)
    benchmark(IMPLS[impl].build_tree, parents, 512)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [16, 64, 256])
def bench_prune_tree(benchmark, impl, T):
    tokens, parents, logp, gen = _tree(T)
    N = 225  # one C2T layer: 15 frontier nodes x 15 children
    args = (tokens, parents, logp, torch.randint(0, T, (N,), generator=gen),
            torch.randint(0, 49152, (N,), generator=gen), -torch.rand(N, generator=gen),
            torch.rand(N, generator=gen), torch.rand(N, generator=gen) < 0.5, 15)
    benchmark.group = _group("prune_tree", T)
    benchmark(IMPLS[impl].prune_tree, *args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [16, 64, 256])
def bench_rerank_tree(benchmark, impl, T):
    tokens, parents, logp, _ = _tree(T)
    benchmark.group = _group("rerank_tree", T)
    benchmark(IMPLS[impl].rerank_tree, tokens, parents, logp, T // 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [16, 64, 256])
def bench_verify_greedy(benchmark, impl, T):
    tokens, parents, _, gen = _tree(T)
    pred = tokens[torch.randint(0, T, (T,), generator=gen)]  # argmax ids, some matches
    benchmark.group = _group("verify_greedy", T)
    benchmark(IMPLS[impl].verify_greedy, tokens, parents, pred)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [16, 64, 256])
def bench_verify_sample(benchmark, impl, T):
    tokens, parents, _, gen = _tree(T)
    probs = torch.softmax(torch.randn(T, 49152, generator=gen), -1)
    u = torch.rand(T, dtype=torch.float64, generator=gen)
    benchmark.group = _group("verify_sample", T)
    benchmark(IMPLS[impl].verify_sample, tokens, parents, probs, u)


def _caches(T, prefix=512):
    return [torch.randn(1, HKV, prefix + T, D) for _ in range(2 * LAYERS)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [16, 64, 256])
def bench_compact_kv(benchmark, impl, T):
    caches = _caches(T)
    accepted = torch.tensor([0, 1, 3, 6, 9, 12]) * (T // 16)  # a 6-node path spread over the tree
    benchmark.group = _group("compact_kv", T)
    benchmark(IMPLS[impl].compact_kv, caches, 512, accepted)


@pytest.mark.parametrize("impl", IMPLS)
def bench_verification_step(benchmark, impl):
    """build_tree + verify_greedy + compact_kv for T=64 on a SmolLM2-shaped 30-layer cache."""
    T = 64
    tokens, parents, _, gen = _tree(T)
    b = OPS.build_tree(parents, 512)
    # a target whose argmax accepts the path along the first retrieve row
    path = b[3][0][b[3][0] >= 0]
    pred = torch.randint(0, 49152, (T,), generator=gen)
    pred[path[:-1]] = tokens[path[1:]]
    caches = _caches(T)
    impl_ = IMPLS[impl]

    def step():
        impl_.build_tree(parents, 512)
        acc, _ = impl_.verify_greedy(tokens, parents, pred)
        impl_.compact_kv(caches, 512, acc)

    benchmark.group = "step: build_tree + verify_greedy + compact_kv, T=64, 30 layers"
    benchmark(step)
