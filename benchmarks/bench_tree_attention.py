"""Tree attention on the CPU, one layer of SmolLM2-135M (9 query / 3 KV heads, D 64):
c2t_fast's CPU path vs transformers' own `sdpa` and `eager` attention with a dense 4D tree mask
(the mask is built once outside the timed call, as HF builds it once per forward).

Run: pytest benchmarks/bench_tree_attention.py --benchmark-enable --benchmark-json=attn.json
"""

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

import c2t_fast
from c2t_fast import reference as ref
from support import random_parents

HQ, HKV, D = 9, 3, 64
MODULE = SimpleNamespace(num_key_value_groups=HQ // HKV, is_causal=True, training=False)


def _inputs(P, T):
    gen = torch.Generator().manual_seed(P + T)
    q = torch.randn(1, HQ, T, D, generator=gen)
    k = torch.randn(1, HKV, P + T, D, generator=gen)
    v = torch.randn(1, HKV, P + T, D, generator=gen)
    bits = c2t_fast.build_tree(random_parents(T, "wide", gen)).ancestor_bits
    tree = ref.ancestor_mask(bits, T)
    dense = torch.cat([torch.ones(T, P, dtype=torch.bool), tree], -1)[None, None]  # [1, 1, T, S]
    return q, k, v, bits, dense


IMPLS = {
    "c2t_fast": lambda q, k, v, bits, dense, P: c2t_fast.tree_attention(q, k, v, bits, P),
    "hf_sdpa_dense_mask": lambda q, k, v, bits, dense, P: sdpa_attention_forward(
        MODULE, q, k, v, dense, scaling=D ** -0.5)[0],
    "hf_eager_dense_mask": lambda q, k, v, bits, dense, P: eager_attention_forward(
        MODULE, q, k, v, torch.where(dense, 0.0, float("-inf")), scaling=D ** -0.5)[0],
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [16, 64])
@pytest.mark.parametrize("P", [512, 2048])
def bench_tree_attention_cpu(benchmark, impl, P, T):
    q, k, v, bits, dense = _inputs(P, T)
    fn = IMPLS[impl]
    torch.testing.assert_close(fn(q, k, v, bits, dense, P), IMPLS["c2t_fast"](q, k, v, bits, dense, P),
                               rtol=1e-4, atol=1e-4)
    benchmark.group = f"tree_attention prefix={P} T={T}"
    benchmark(fn, q, k, v, bits, dense, P)
