"""Batch > 1 with a tree per sequence (decoding.batch): every row equals the target's own greedy output
(alone and in stock batched generate with left padding) for every strategy and draft kind, rows finish on
their own, sampling follows the target's law per row (a broken rule is caught), bad input is refused before
anything runs; and the tree pass of the static-cache forward equals the model's own forward."""

import numpy as np
import pytest
import torch
import transformers
from scipy.stats import chisquare

from c2t_fast.decoding.batch import BatchSpeculativeGenerator
from c2t_fast.decoding.classifier import C2TClassifier
from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.strategies import C2T, Chain, ChainC2T, Eagle2, Static
from c2t_fast.hf.adapter import generate_batch, sampling_probs
from c2t_fast.hf.static_batch import StaticBatchLM
from support import tiny_causal_lm

GEN = torch.Generator().manual_seed(0)
PROMPTS = [torch.randint(0, 97, (n,), generator=GEN).tolist() for n in (12, 5, 9, 7)]


def _strategy(name):
    torch.manual_seed(0)
    return {"chain": Chain(4), "eagle2": Eagle2(top_k=4, depth=3, total_tokens=20),
            "c2t": C2T(C2TClassifier(), beta=0.3, top_k=4, d_max=4, top_m=50),
            "chain_c2t": ChainC2T(C2TClassifier(), beta=0.3, top_m=50), "static": Static()}[name]


def _draft(kind, family, target):
    if kind == "head":
        return EagleDraftHead(target.config).attach(target)
    if kind == "self":  # the target's twin: long accepted runs, trees of different sizes per row
        return DraftLM(tiny_causal_lm(family, 6, 2, seed=1))
    return None


def _alone(target, prompt, n, eos=None):
    out = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("draft_kind", ["head", "self", "none"])
@pytest.mark.parametrize("strategy", ["chain", "eagle2", "c2t"])
def test_greedy_rows_equal_the_target_alone(family, draft_kind, strategy):
    target = tiny_causal_lm(family, 6, 2, seed=1)
    gen = BatchSpeculativeGenerator(target, _draft(draft_kind, family, target), _strategy(strategy), eos_token_id=[],
                                    ngram=3 if draft_kind == "none" else None, datastore=None, recycling=None, budget=None)
    out = gen.generate(PROMPTS, max_new_tokens=29)
    assert out.tokens == [_alone(target, p, 29) for p in PROMPTS]
    assert out.passes == len(out.rows_per_pass) and out.metrics.new_tokens == 4 * 29
    if draft_kind == "self" and strategy == "chain":
        assert out.metrics.tau > 2 and out.passes < 29 // 2


@pytest.mark.parametrize("draft_kind", ["head", "self"])
@pytest.mark.parametrize("strategy", ["chain_c2t", "static"])
def test_greedy_rows_equal_the_target_alone_with_the_other_strategies(draft_kind, strategy):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    gen = BatchSpeculativeGenerator(target, _draft(draft_kind, "llama", target), _strategy(strategy), eos_token_id=[],
                                    ngram=3, datastore=None, recycling=None, budget=None)
    assert gen.generate(PROMPTS, max_new_tokens=21).tokens == [_alone(target, p, 21) for p in PROMPTS]


def test_padded_tensor_input_equals_stock_batched_generate():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    n = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (n - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in PROMPTS])
    gen = BatchSpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), Chain(3), eos_token_id=[],
                                    ngram=None, datastore=None, recycling=None, budget=None)
    out = gen.generate(ids, mask, max_new_tokens=20)
    stock = generate_batch(target, [torch.tensor(p) for p in PROMPTS], 20, pad_id=0)
    assert out.tokens == [s.tolist() for s in stock]


def test_rows_stop_on_their_own_and_leave_the_batch():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    refs = [_alone(target, p, 40) for p in PROMPTS]
    eos = refs[1][6]  # row 1 stops early (mid-tree with the twin draft); the others may stop later or not at all
    gen = BatchSpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), Chain(5), eos_token_id=eos,
                                    ngram=None, datastore=None, recycling=None, budget=None)
    out = gen.generate(PROMPTS, max_new_tokens=40)
    assert out.tokens == [_alone(target, p, 40, eos=eos) for p in PROMPTS]
    assert out.tokens[1][-1] == eos and len(out.tokens[1]) == refs[1].index(eos) + 1 <= 7
    assert out.rows_per_pass[0] == 4 and out.rows_per_pass[-1] < 4  # a finished row costs nothing afterwards
    assert sorted(out.rows_per_pass, reverse=True) == out.rows_per_pass


def test_max_nodes_caps_every_row_tree():
    target = tiny_causal_lm("qwen2", 6, 2, seed=1)
    gen = BatchSpeculativeGenerator(target, EagleDraftHead(target.config).attach(target), _strategy("eagle2"),
                                    eos_token_id=[], ngram=3, datastore=None, recycling=None, max_nodes=6, budget=None)
    out = gen.generate(PROMPTS, max_new_tokens=16)
    assert out.tokens == [_alone(target, p, 16) for p in PROMPTS]
    assert max(out.metrics.draft_tokens) == 5  # the root and 5 nodes, though the strategy grows 20


def test_seeded_sampling_repeats_and_seeds_differ():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    gen = BatchSpeculativeGenerator(target, EagleDraftHead(target.config).attach(target), Chain(3), eos_token_id=[],
                                    ngram=None, datastore=None, recycling=None, budget=None)
    a = gen.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=7).tokens
    assert a == gen.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=7).tokens
    assert a != gen.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=8).tokens


@pytest.mark.slow
def test_sampling_follows_each_rows_law_and_a_broken_rule_is_caught(monkeypatch):
    V, N = 5, 1000
    target = tiny_causal_lm("llama", 4, 2, seed=3, vocab=V)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=4, vocab=V))
    prompts = [[1, 2, 3], [4, 0]]  # two rows of different lengths in every pass
    gen = BatchSpeculativeGenerator(target, draft, Eagle2(top_k=2, depth=1, total_tokens=5), eos_token_id=[],
                                    ngram=None, datastore=None, recycling=None, budget=None)
    joints = []
    with torch.no_grad():  # each row's exact joint law of its first two tokens at temperature 0.8, top-k 4
        for p in prompts:
            p = torch.tensor(p)
            p1 = sampling_probs(target(p[None]).logits[0, -1], 0.8, 4, 1.0)[0]
            second = torch.stack([sampling_probs(target(torch.cat([p, torch.tensor([a])])[None]).logits[0, -1], 0.8,
                                                 4, 1.0)[0] for a in range(V)])
            joints.append((p1[:, None] * second).flatten().double().numpy())

    def pvalues():
        counts = [{}, {}]
        for seed in range(N):
            for c, toks in zip(counts, gen.generate(prompts, max_new_tokens=2, temperature=0.8, top_k=4,
                                                    seed=seed).tokens):
                c[tuple(toks)] = c.get(tuple(toks), 0) + 1
        out = []
        for c, joint in zip(counts, joints):
            cells = np.flatnonzero(joint > 0)
            obs = np.array([c.get((i // V, i % V), 0) for i in cells], dtype=float)
            outside = sum(c.values()) - obs.sum()  # draws outside the support (top-k not respected)
            out.append(0.0 if outside else chisquare(obs, joint[cells] / joint[cells].sum() * obs.sum()).pvalue)
        return out

    assert min(pvalues()) > 1e-3

    def always_first_child(tokens, parents, probs, uniforms=None, generator=None):
        from c2t_fast import ops

        kids = (parents == 0).nonzero().view(-1)
        path = torch.tensor([0, int(kids[0])]) if kids.numel() else torch.tensor([0])
        return ops.Verdict(path, torch.multinomial(probs[int(path[-1])].float(), 1)[0])

    import c2t_fast.decoding.batch as batch

    monkeypatch.setattr(batch.ops, "verify_sample", always_first_child)
    assert min(pvalues()) < 1e-6


def test_bad_input_is_refused_before_anything_runs():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    gen = BatchSpeculativeGenerator(target, None, Chain(2), eos_token_id=[], ngram=3, datastore=None, recycling=None, budget=None)
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    cases = [
        (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids must be \\[B, n\\]"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.int64)), "input_ids must be \\[B, n\\]"),
        (dict(input_ids=ids.float()), "int64 or int32"),
        (dict(input_ids=ids, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), "left padding"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 2)), "attention_mask must be"),
        (dict(input_ids=ids, attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]])), "row 0 is empty"),
        (dict(input_ids=[[1, 2], [3, 500]]), "row 1 holds ids outside"),
        (dict(input_ids=[[1, 2], []]), "row 1 is empty"),
        (dict(input_ids="hello"), "input_ids must be"),
        (dict(input_ids=[[1, 2]], max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=[[1, 2]], temperature=-1.0), "temperature"),
        (dict(input_ids=[[1, 2]], top_p=0.0), "top_p"),
        (dict(input_ids=[[1, 2]], seed=-3), "seed"),
        (dict(input_ids=[[1, 2]], max_new_tokens=10 ** 6), "exceeds the target's context"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            gen.generate(**kwargs)
    assert gen.generate([[1, 2]], max_new_tokens=3).tokens == [_alone(target, [1, 2], 3)]  # still usable
    with pytest.raises(ValueError, match="max_nodes"):
        BatchSpeculativeGenerator(target, None, Chain(2), ngram=3, datastore=None, recycling=None, max_nodes=0, budget=None)
    with pytest.raises(ValueError, match="training-free sources alone"):
        BatchSpeculativeGenerator(target, None, Chain(2), ngram=None, datastore=None, recycling=None, budget=None)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97))
    with pytest.raises(ValueError, match="supports"):
        BatchSpeculativeGenerator(gpt2, None, Chain(2), ngram=3, datastore=None, recycling=None, budget=None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tree_pass_equals_the_models_forward_along_each_path(family):
    """Per row, every tree node's logits equal the model's own forward over prefix + the node's path; keep()
    then commits a path exactly as if it had been decoded."""
    model = tiny_causal_lm(family, 6, 2, seed=5)
    lm = StaticBatchLM(model, slots=3, capacity=64, linear="torch")
    prefixes = {0: [3, 4, 5, 6, 7], 2: [9, 1]}
    for slot, p in prefixes.items():
        lm.prefill(slot, torch.tensor(p))
    trees = {0: ([11, 12, 13, 14], [-1, 0, 0, 1]), 2: ([21, 22, 23], [-1, 0, 1])}  # padded to T = 4
    T = 4
    tokens = torch.zeros(2, T, dtype=torch.int64)
    depth = torch.zeros(2, T, dtype=torch.int64)
    visible = torch.eye(T, dtype=torch.bool).repeat(2, 1, 1)
    paths = {}
    for i, (slot, (toks, parents)) in enumerate(trees.items()):
        for j, (t, par) in enumerate(zip(toks, parents)):
            tokens[i, j] = t
            path = [j] if par < 0 else paths[(slot, par)] + [j]
            paths[(slot, j)] = path
            depth[i, j] = len(path) - 1
            visible[i, j, path] = True
    out = lm.tree_pass([0, 2], tokens, depth, visible)
    with torch.no_grad():
        for i, (slot, (toks, _)) in enumerate(trees.items()):
            for j in range(len(toks)):
                seq = prefixes[slot] + [toks[k] for k in paths[(slot, j)]]
                ref = model(torch.tensor([seq])).logits[0, -1].float()
                torch.testing.assert_close(out.logits[i, j], ref, atol=1e-4, rtol=1e-4)
        lm.keep(0, [0, 1, 3])  # commit the path 11 -> 12 -> 14, then decode one token after it
        nxt = lm.prefill(0, torch.tensor([5]))
        ref = model(torch.tensor([prefixes[0] + [11, 12, 14, 5]])).logits[0, -1].float()
        torch.testing.assert_close(nxt.logits[0], ref, atol=1e-4, rtol=1e-4)
    for bad, msg in (((0, 0), "distinct"), ((5,), "slot must be")):
        with pytest.raises(ValueError, match=msg):
            lm.tree_pass(list(bad), tokens[:len(bad)], depth[:len(bad)], visible[:len(bad)])
    with pytest.raises(ValueError, match="visible must be"):
        lm.tree_pass([0, 2], tokens, depth, visible.int())
    with pytest.raises(ValueError, match="nodes must be"):
        lm.keep(2, [])


def _rule(t1=0.1, slope=0.0):
    from c2t_fast.decoding.cost import CostProfile, CostRule

    L = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    return CostRule(CostProfile(L, [t1 + slope * (t - 1) for t in L]), draft_cost=0.0)


@pytest.mark.parametrize("strategy", ["eagle2", "c2t"])
def test_the_cost_rule_sizes_the_batch_and_stays_lossless(strategy):
    """With the batch's cost at b x T tokens: free tokens let every row verify its whole (capped) tree; a
    steep cost cuts every tree to the root (plain steps for the whole batch); greedy equal to the target
    alone either way."""
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    refs = [_alone(target, p, 20) for p in PROMPTS]
    widths = {}
    for name, rule in (("free", _rule(0.1, 0.0)), ("steep", _rule(0.1, 0.5))):
        gen = BatchSpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 6, 2, seed=1)), _strategy(strategy),
                                        eos_token_id=[], ngram=3, datastore=None, recycling=None, budget=rule,
                                        max_nodes=12)
        out = gen.generate(PROMPTS, max_new_tokens=20)
        assert out.tokens == refs
        widths[name] = out.metrics
    assert max(widths["free"].draft_tokens) == 11 and widths["free"].tau > 1
    assert widths["steep"].plain_steps == widths["steep"].steps and widths["steep"].tau == 0


def test_size_batch_chooses_the_common_width_by_the_batch_cost():
    """Two rows whose nodes are certain: at a cost flat up to 8 tokens and steep after, a batch of two keeps
    3 nodes per row (2 x 4 = 8 tokens), where one sequence alone would keep 7."""
    from c2t_fast import ops
    from c2t_fast.decoding.cost import CostProfile, CostRule
    from c2t_fast.decoding.drafts.sources import StepTree

    prof = CostProfile([1, 8, 9, 64], [1.0, 1.0, 10.0, 100.0])
    rule = CostRule(prof, draft_cost=0.0)
    chain = ops.Tree(torch.arange(10), torch.arange(-1, 9, dtype=torch.int32), torch.zeros(10))  # logp 0: p = 1
    sized = rule.size_batch([StepTree.of(chain), StepTree.of(chain)], [None, None], 0.0, backoff=False)
    assert [z.step.tree.tokens.numel() for z in sized] == [4, 4]
    assert rule.size(StepTree.of(chain), None, 0.0, backoff=False).step.tree.tokens.numel() == 8
