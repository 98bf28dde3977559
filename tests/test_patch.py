"""c2t_fast.patch(model): tree passes equal chain passes; outside trees the model is unchanged."""

import copy

import pytest
import torch
import transformers

import c2t_fast
from c2t_fast.hf.attention import ATTN_NAME
from support import load_smollm2, random_parents, tiny_causal_lm

FAMILIES = ["llama", "qwen2", "mistral"]


def _tree_vs_chain(model, prefix_ids, tokens, parents, atol):
    """Max |logit difference| between each node of one tree pass and its root->node chain."""
    P = prefix_ids.shape[1]
    with torch.no_grad():
        cache = model(prefix_ids, use_cache=True).past_key_values
        b = c2t_fast.build_tree(parents, P)
        c2t_fast.patch(model)
        tree_logits = model(tokens[None], position_ids=b.position_ids[None], past_key_values=copy.deepcopy(cache),
                            c2t_tree_bits=b.ancestor_bits).logits[0]
        c2t_fast.unpatch(model)
        for i in range(len(tokens)):
            path, j = [], i
            while j != -1:
                path.append(j)
                j = int(parents[j])
            chain = model(tokens[path[::-1]][None], past_key_values=copy.deepcopy(cache)).logits[0, -1]
            torch.testing.assert_close(tree_logits[i], chain, atol=atol, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (8, 2), (8, 1)])
def test_tree_logits_equal_chain_logits(family, heads, kv_heads):
    model = tiny_causal_lm(family, heads, kv_heads, seed=heads + kv_heads)
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        P = int(torch.randint(1, 40, (1,), generator=gen))
        T = 12
        prefix = torch.randint(0, 97, (1, P), generator=gen)
        tokens = torch.randint(0, 97, (T,), generator=gen)
        _tree_vs_chain(model, prefix, tokens, random_parents(T, ["wide", "random"][seed], gen), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_is_unchanged_outside_trees(family):
    model = tiny_causal_lm(family, 6, 2, seed=3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        base_gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        c2t_fast.patch(model)
        assert model.config._attn_implementation == ATTN_NAME
        patched = model(ids, attention_mask=mask).logits
        patched_gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        c2t_fast.unpatch(model)
    assert torch.equal(base, patched)
    assert torch.equal(base_gen, patched_gen)
    assert model.config._attn_implementation == "sdpa"


def test_patch_is_per_model_and_idempotent():
    a, b = tiny_causal_lm("llama", seed=1), tiny_causal_lm("llama", seed=2)
    c2t_fast.patch(a)
    c2t_fast.patch(a)
    assert a.config._attn_implementation == ATTN_NAME and b.config._attn_implementation == "sdpa"
    eager = transformers.AutoModelForCausalLM.from_config(a.config.__class__(**{
        **b.config.to_dict(), "_attn_implementation": None}), attn_implementation="eager").eval()
    c2t_fast.patch(eager)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        patched = eager(ids).logits
        c2t_fast.unpatch(eager)
        assert eager.config._attn_implementation == "eager"
        assert torch.equal(patched, eager(ids).logits)
    c2t_fast.unpatch(a)
    assert a.config._attn_implementation == "sdpa"


def test_unsupported_families_get_clear_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supports the model families llama, qwen2, mistral; got 'gpt2'"):
        c2t_fast.patch(gpt2)
    gemma = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
        head_dim=8, vocab_size=50))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        c2t_fast.patch(gemma)
    mistral = tiny_causal_lm("mistral")
    mistral.config.sliding_window = 64
    with pytest.raises(NotImplementedError, match="sliding-window attention"):
        c2t_fast.patch(mistral)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_smollm2_tree_equals_chain(smollm2):
    model, tok = smollm2
    prefix = tok("The quick brown fox jumps over the lazy dog. Then", return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    T = 10
    tokens = torch.randint(0, model.config.vocab_size, (T,), generator=gen)
    _tree_vs_chain(model, prefix, tokens, random_parents(T, "wide", gen), atol=2e-3)


def test_smollm2_generate_identical_when_patched(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Name three colors."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        base = model.generate(ids, max_new_tokens=24, do_sample=False)
        c2t_fast.patch(model)
        try:
            patched = model.generate(ids, max_new_tokens=24, do_sample=False)
        finally:
            c2t_fast.unpatch(model)
    assert torch.equal(base, patched)
