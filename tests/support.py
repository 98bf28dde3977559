"""Shared helpers of the tests (and benchmarks): devices, random token trees of every shape."""

from __future__ import annotations

import pytest
import torch


def devices():
    """cpu always; cuda (marked gpu, skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_parents(T: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """int32[T] topological parents. kinds: chain, star, wide (EAGLE-like layers), deep, random."""
    if T == 1:
        return torch.tensor([-1], dtype=torch.int32)
    idx = torch.arange(T)
    if kind == "chain":
        p = idx - 1
    elif kind == "star":
        p = torch.zeros(T, dtype=torch.int64)
    elif kind == "deep":  # mostly chain with occasional branches back up a few levels
        back = torch.randint(1, 4, (T,), generator=gen)
        p = (idx - back).clamp(min=0)
    elif kind == "wide":  # layers of up to 8 nodes, each node's parent in the previous layer
        p = torch.zeros(T, dtype=torch.int64)
        layer_start, prev = 1, [0]
        while layer_start < T:
            width = min(int(torch.randint(1, 9, (1,), generator=gen)), T - layer_start)
            layer = list(range(layer_start, layer_start + width))
            for n in layer:
                p[n] = prev[int(torch.randint(len(prev), (1,), generator=gen))]
            prev, layer_start = layer, layer_start + width
    elif kind == "random":
        p = (torch.rand(T, generator=gen) * idx).floor().to(torch.int64)
    else:
        raise ValueError(kind)
    p[0] = -1
    return p.to(torch.int32)


KINDS = ["chain", "star", "wide", "deep", "random"]
