"""verify_sample is lossless: the emitted tokens follow the target distribution, whatever the tree.

A chi-square test on 100k draws with a fixed seed; a deliberately wrong acceptance rule (no residual
renormalisation) is run through the same test to show that the test can fail.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import c2t_fast

V = 5
DRAWS = 100_000
# root -> children tokens 1, 3, 1 (a duplicate), 0 in try order; node 1 (token 1) -> tokens 2, 4.
TOKENS = torch.tensor([0, 1, 3, 1, 0, 2, 4])
PARENTS = torch.tensor([-1, 0, 0, 0, 0, 1, 1], dtype=torch.int32)
PROBS = torch.tensor([
    [0.10, 0.35, 0.05, 0.30, 0.20],  # target at the root
    [0.25, 0.05, 0.40, 0.10, 0.20],  # target after token 1
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [0.2, 0.2, 0.2, 0.2, 0.2],
    [0.2, 0.2, 0.2, 0.2, 0.2],
], dtype=torch.float64)


def _emitted(path, bonus):
    """The first two tokens the step emits (the second only when the first was accepted)."""
    toks = [int(TOKENS[n]) for n in path[1:]] + [int(bonus)]
    first = toks[0]
    second = toks[1] if len(path) >= 2 and int(path[1]) == 1 else None
    return first, second


def _counts(sampler):
    gen = torch.Generator().manual_seed(1234)
    u = torch.rand(DRAWS, len(TOKENS), dtype=torch.float64, generator=gen)
    first = np.zeros(V)
    second = np.zeros(V)
    for row in u:
        path, bonus = sampler(row)
        f, s = _emitted(path.tolist(), bonus)
        first[f] += 1
        if s is not None:
            second[s] += 1
    return first, second


def _op(u):
    return torch.ops.c2t_fast.verify_sample(TOKENS, PARENTS, PROBS, u)


def _no_residual(u):
    """Wrong on purpose: tries siblings with the *original* p (no zeroing / renormalisation) and
    draws the bonus from the original p."""
    cur, path = 0, [0]
    while True:
        kids = [c for c in range(len(TOKENS)) if int(PARENTS[c]) == cur]
        nxt = next((c for c in kids if float(u[c]) < float(PROBS[cur, TOKENS[c]])), None)
        if nxt is None:
            break
        path.append(nxt)
        cur = nxt
    cdf = torch.cumsum(PROBS[cur], 0)
    return torch.tensor(path), int((cdf > u[0]).nonzero()[0])


def _pvalues(sampler):
    first, second = _counts(sampler)
    p1 = chisquare(first, PROBS[0].numpy() * first.sum()).pvalue
    p2 = chisquare(second, PROBS[1].numpy() * second.sum()).pvalue
    return p1, p2


@pytest.mark.slow
def test_verify_sample_matches_the_target_distribution():
    p1, p2 = _pvalues(_op)
    assert p1 > 1e-3 and p2 > 1e-3, (p1, p2)


@pytest.mark.slow
def test_the_chi_square_test_catches_a_wrong_rule():
    p1, _ = _pvalues(_no_residual)
    assert p1 < 1e-6, p1
