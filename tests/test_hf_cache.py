"""compact_kv applied to a transformers DynamicCache."""

import pytest
import torch
from transformers import DynamicCache

from c2t_fast.hf.attention import compact_dynamic_cache


def test_compact_dynamic_cache_keeps_the_accepted_path():
    gen = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    L, prefix, T = 5, 9, 7
    for layer in range(L):
        k = torch.randn(1, 3, prefix + T, 16, generator=gen)
        cache.update(k, k * 2 + 1, layer)
    before = [(lay.keys.clone(), lay.values.clone()) for lay in cache.layers]
    accepted = torch.tensor([0, 2, 5])
    new_len = compact_dynamic_cache(cache, prefix, accepted)
    assert new_len == prefix + 3 == cache.get_seq_length()
    rows = torch.cat([torch.arange(prefix), prefix + accepted])
    for lay, (k, v) in zip(cache.layers, before):
        assert torch.equal(lay.keys, k[:, :, rows]) and torch.equal(lay.values, v[:, :, rows])
    # the cache keeps working: the next step appends after the compacted path
    cache.update(torch.zeros(1, 3, 2, 16), torch.zeros(1, 3, 2, 16), 0)
    assert cache.layers[0].keys.shape[2] == new_len + 2


def test_compact_dynamic_cache_rejects_an_empty_cache():
    with pytest.raises(ValueError, match="holds no"):
        cache = DynamicCache()
        cache.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 1)  # layer 0 never filled
        compact_dynamic_cache(cache, 0, torch.tensor([0]))
    with pytest.raises(TypeError, match="DynamicCache"):
        compact_dynamic_cache(object(), 0, torch.tensor([0]))
