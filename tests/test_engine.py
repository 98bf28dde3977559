"""The speculative generation engine: greedy losslessness for every strategy and draft, sampling
losslessness (a statistical test that a broken acceptance rule fails), degenerate settings, metrics,
tree recording, bad input."""

import numpy as np
import pytest
import torch
import transformers
from scipy.stats import chisquare

from c2t_fast import ops
from c2t_fast.decoding.classifier import C2TClassifier
from c2t_fast.training.tree_dataset import TreeRecorder, open_tree_dataset
from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.hf.adapter import sampling_probs
from c2t_fast.decoding.strategies import C2T, Chain, ChainC2T, Eagle2, Static
from support import tiny_causal_lm

PROMPT = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(0))


def _strategies():
    torch.manual_seed(0)
    clf = C2TClassifier()
    return {"chain": Chain(4), "chain_c2t": ChainC2T(clf, beta=0.3, top_m=50), "static": Static(),
            "eagle2": Eagle2(top_k=4, depth=3, total_tokens=20),
            "c2t": C2T(clf, beta=0.3, top_k=4, d_max=4, top_m=50)}


def _reference(target, n, prompt=PROMPT, eos=None):
    out = target.generate(prompt[None], do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, prompt.numel():].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("draft_kind", ["head", "lm", "self"])
@pytest.mark.parametrize("strategy", ["chain", "chain_c2t", "static", "eagle2", "c2t"])
def test_greedy_is_lossless(family, draft_kind, strategy):
    target = tiny_causal_lm(family, 6, 2, seed=1)
    if draft_kind == "head":
        draft = EagleDraftHead(target.config).attach(target)
    elif draft_kind == "lm":
        draft = DraftLM(tiny_causal_lm(family, 4, 2, seed=2))
    else:  # the target's twin as draft: long accepted runs
        draft = DraftLM(tiny_causal_lm(family, 6, 2, seed=1))
    gen = SpeculativeGenerator(target, draft, _strategies()[strategy], eos_token_id=[], budget=None, ngram=None)
    out = gen.generate(PROMPT, max_new_tokens=37)
    assert out.tokens == _reference(target, 37)
    if draft_kind == "self" and strategy in ("chain", "static"):
        assert out.metrics.tau > 2


def test_eos_inside_a_tree_and_max_tokens_mid_tree():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    ref = _reference(target, 40)
    eos = ref[13]  # a token the target emits mid-sequence: generation must stop right there
    gen = SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), Chain(5), eos_token_id=eos, budget=None, ngram=None)
    out = gen.generate(PROMPT, max_new_tokens=40)
    assert out.tokens == _reference(target, 40, eos=eos) and out.tokens[-1] == eos
    gen = SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), Chain(5), eos_token_id=[], budget=None, ngram=None)
    for n in (1, 2, 7, 11):
        assert gen.generate(PROMPT, max_new_tokens=n).tokens == ref[:n]


def test_metrics_on_a_perfect_draft():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    gen = SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), Chain(3), eos_token_id=[], budget=None, ngram=None)
    m = gen.generate(PROMPT, max_new_tokens=33, baseline=True).metrics
    # 1 token from prefill, then 8 steps of 3 accepted + 1 bonus
    assert m.steps == 8 and m.accepted == [3] * 8 and m.tau == 3.0
    assert m.draft_tokens == [3] * 8 and m.gamma == 24 and m.new_tokens == 33
    assert m.baseline_time > 0 and m.speedup is not None and m.tokens_per_s > 0
    assert set(m.summary()) >= {"tau", "gamma", "draft_time_s", "verify_time_s", "tokens_per_s", "speedup"}


def test_degenerate_settings():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    clf = C2TClassifier()
    ref = _reference(target, 12)

    def run(strategy):
        g = SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 4, 2, seed=2)), strategy, eos_token_id=[], budget=None, ngram=None)
        return g.generate(PROMPT, max_new_tokens=12)

    full = run(C2T(clf, beta=0.0, top_k=2, d_max=3, top_m=10, second_prune=False, max_nodes=1000))
    assert full.tokens == ref and set(full.metrics.draft_tokens) == {2 + 4 + 8}  # the full expanded tree
    none = run(C2T(clf, beta=1.0, top_k=2, d_max=3, top_m=10))
    assert none.tokens == ref and none.metrics.gamma == 0 and none.metrics.steps == 11  # root only
    ar = run(Eagle2(top_k=3, depth=2, total_tokens=1))
    assert ar.tokens == ref and ar.metrics.gamma == 0 and ar.metrics.steps == 11  # plain decoding


def test_recorder_receives_full_trees(tmp_path):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    strategy = Eagle2(top_k=3, depth=2, total_tokens=1 + 3 + 2 * 9)  # no rerank: every node verified
    with TreeRecorder(str(tmp_path / "trees")) as rec:
        g = SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), strategy, eos_token_id=[],
                                 recorder=rec)
        m = g.generate(PROMPT, max_new_tokens=15).metrics
    rows = open_tree_dataset(str(tmp_path / "trees"))
    assert len(rows) == m.steps * (3 + 18)
    per_tree = np.bincount(rows["tree"], weights=rows["label"]).astype(int)
    assert per_tree.tolist() == m.accepted  # labels = nodes on the accepted path
    assert rows["d"].min() == 0 and rows["d"].max() == 2 and (rows["P"] <= 1).all() and (rows["H"] >= 0).all()


def _first_two(gen_fn, n):
    counts = {}
    for seed in range(n):
        toks = gen_fn(seed)
        counts[tuple(toks[:2])] = counts.get(tuple(toks[:2]), 0) + 1
    return counts


@pytest.mark.slow
def test_sampling_is_lossless_and_a_broken_rule_is_caught(monkeypatch):
    V, N = 5, 1500
    target = tiny_causal_lm("llama", 4, 2, seed=3, vocab=V)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=4, vocab=V))
    prompt = torch.tensor([1, 2, 3])
    gen = SpeculativeGenerator(target, draft, Eagle2(top_k=2, depth=1, total_tokens=5), eos_token_id=[], budget=None, ngram=None)
    with torch.no_grad():  # exact joint law of the first two tokens at temperature 0.8, top-k 4
        p1 = sampling_probs(target(prompt[None]).logits[0, -1], 0.8, 4, 1.0)[0]
        seconds = torch.stack([sampling_probs(target(torch.cat([prompt, torch.tensor([a])])[None]).logits[0, -1], 0.8, 4,
                                          1.0)[0] for a in range(V)])
    joint = (p1[:, None] * seconds).flatten().double().numpy()

    def pvalue():
        c = _first_two(lambda s: gen.generate(prompt, max_new_tokens=2, temperature=0.8, top_k=4, seed=s).tokens, N)
        cells = np.flatnonzero(joint > 0)
        obs = np.array([c.get((i // V, i % V), 0) for i in cells], dtype=float)
        assert sum(c.values()) == obs.sum()  # nothing outside the support (top-k respected)
        return chisquare(obs, joint[cells] / joint[cells].sum() * obs.sum()).pvalue

    assert pvalue() > 1e-3

    def always_first_child(tokens, parents, probs, uniforms=None, generator=None):
        kids = (parents == 0).nonzero().view(-1)
        path = torch.tensor([0, int(kids[0])]) if kids.numel() else torch.tensor([0])
        return ops.Verdict(path, torch.multinomial(probs[int(path[-1])].float(), 1)[0])

    import c2t_fast.decoding.engine as engine

    monkeypatch.setattr(engine.ops, "verify_sample", always_first_child)
    assert pvalue() < 1e-6


def test_bad_inputs():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    with pytest.raises(ValueError, match="differs from the target's"):
        SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 4, 2, seed=2, vocab=50)), Chain(2), budget=None, ngram=None)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97))
    with pytest.raises(ValueError, match="supports the model families"):
        SpeculativeGenerator(gpt2, DraftLM(tiny_causal_lm("llama", 4, 2, seed=2)), Chain(2), budget=None, ngram=None)
    gen = SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 4, 2, seed=2)), Chain(2), budget=None, ngram=None)
    with pytest.raises(ValueError, match="exceeds the target's context"):  # 505 + 10 + a chain of 2 > 512
        gen.generate(torch.zeros(505, dtype=torch.int64), max_new_tokens=10)
    with pytest.raises(ValueError, match="batch size 2"):
        gen.generate(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(PROMPT, temperature=-1)
    with pytest.raises(ValueError, match="c2t needs beta"):
        C2T(C2TClassifier(), beta=1.5)
    with pytest.raises(ValueError, match="lacks its parent path"):
        Static(choices=((0, 1),))
    with pytest.raises(ValueError, match="needs a classifier"):
        C2T(None)


def test_smollm2_greedy_is_lossless():
    from support import load_smollm2

    model, tok = load_smollm2()
    try:
        ids = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"][0]
        torch.manual_seed(0)
        gen = SpeculativeGenerator(model, EagleDraftHead(model.config).attach(model),
                                   C2T(C2TClassifier(), beta=0.2, top_k=4, d_max=3, top_m=100), eos_token_id=[], budget=None, ngram=None)
        out = gen.generate(ids, max_new_tokens=20)
        assert out.tokens == _reference(model, 20, ids)
    finally:
        from c2t_fast import unpatch

        unpatch(model)


def test_draft_head_save_load_round_trip(tmp_path):
    target = tiny_causal_lm("qwen2", 6, 2, seed=1)
    torch.manual_seed(0)
    head = EagleDraftHead(target.config).attach(target)
    head.save_pretrained(str(tmp_path))
    loaded = EagleDraftHead.from_pretrained(str(tmp_path), target)
    feats, toks, pos = torch.randn(1, 5, 96), torch.randint(0, 97, (1, 5)), torch.arange(5)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.features_forward(toks, feats, pos, None),
                                   head.features_forward(toks, feats, pos, None))
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in
                   __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "model.safetensors")))
    with pytest.raises(FileNotFoundError, match="no draft head"):
        EagleDraftHead.from_pretrained(str(tmp_path / "missing"))
    head.save_pretrained(str(tmp_path / "fp16"), dtype=torch.float16)
    half = EagleDraftHead.from_pretrained(str(tmp_path / "fp16"), target)
    assert half.fc.weight.dtype == torch.float32
    torch.testing.assert_close(half.fc.weight, head.fc.weight.half().float())
    other = tiny_causal_lm("llama", 6, 2, seed=1, vocab=101)  # another vocabulary: refused, not mis-attached
    with pytest.raises(ValueError, match="vocab_size 97, this target has 101"):
        EagleDraftHead.from_pretrained(str(tmp_path), other)
