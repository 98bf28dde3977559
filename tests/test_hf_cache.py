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


def test_two_first_conversions_at_once_both_succeed(tmp_path):
    """Two processes converting the shipped model into an empty cache at the same moment: both end with a
    loadable cache (the later rename finds the earlier one's complete conversion in place)."""
    import torch as _torch
    import transformers

    from c2t_fast.hf import shipped
    from support import load_smollm2, run_at_once

    tok = load_smollm2()[1]
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = str(tmp_path / "smollm2")
    _, errors = run_at_once(lambda: shipped._write_cache(model, tok, d, _torch.float32), 2, start_together=True)
    assert not errors and shipped._converted(d, _torch.float32)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary directory left behind
    reloaded, _ = shipped._load_dir(d, _torch.float32)
    assert reloaded.config.hidden_size == 32
