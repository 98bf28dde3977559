"""One WISCA transition of a TinyLlama-1.1B-shaped attention stack (22 layers, 32 query / 4 KV heads,
head dim 64, hidden 2048) with fp32 weights and AdamW moments, on the CPU: the fused op vs a per-layer
torch loop (abs().sum(), mul_). Under the plain test command (benchmarks disabled) it runs once on 2
layers as a smoke test.

Run: pytest benchmarks/bench_rescale.py --benchmark-enable --benchmark-json=rescale.json
"""

import math

import pytest
import torch

import wisca_fast.ops as wops

HQ, HKV, D, C = 32, 4, 64, 2048


def _stack(layers):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(layers):
        ws = [torch.randn(HQ * D, C, generator=gen) * 0.02, torch.randn(HKV * D, C, generator=gen) * 0.02,
              torch.randn(HKV * D, C, generator=gen) * 0.02, torch.randn(C, HQ * D, generator=gen) * 0.02]
        lay = wops.AttentionTensors(*ws)
        for k, w in zip("qkvo", ws):
            lay.exp_avg[k] = torch.randn(w.shape, generator=gen) * 1e-4
            lay.exp_avg_sq[k] = torch.rand(w.shape, generator=gen) * 1e-8
        out.append(lay)
    return out


def fused(layers):
    return wops.rescale_attention_(layers, HQ, HKV, D)


def torch_loop(layers):
    out = []
    for lay in layers:
        s = math.sqrt(lay.wk.abs().sum().item() / lay.wq.abs().sum().item())
        t = math.sqrt(lay.wo.abs().sum().item() / lay.wv.abs().sum().item())
        for key, w, c in (("q", lay.wq, s), ("k", lay.wk, 1 / s), ("v", lay.wv, t), ("o", lay.wo, 1 / t)):
            w.mul_(c)
            lay.exp_avg[key].div_(c)
            lay.exp_avg_sq[key].div_(c * c)
        out.append((s, t))
    return torch.tensor(out)


@pytest.mark.parametrize("impl", ["fused", "torch_loop"])
def bench_rescale_tinyllama_cpu(benchmark, impl):
    layers = _stack(2 if benchmark.disabled else 22)
    fn = {"fused": fused, "torch_loop": torch_loop}[impl]
    benchmark.group = f"WISCA transition, {len(layers)} layers 32/4 heads, hidden 2048, fp32 + AdamW moments"
    benchmark.pedantic(fn, args=(layers,), rounds=1 if benchmark.disabled else 5, iterations=1, warmup_rounds=0)
