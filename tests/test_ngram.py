"""n-gram branches: the lookup against a brute-force search, grafting against its definition, and the
engine with grafted trees lossless (greedy: the target's tokens; sampling: the target's law)."""

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.drafts.ngram import NgramLookup
from c2t_fast.decoding.drafts.sources import NGRAM, Proposal, StepTree
from c2t_fast.decoding.strategies import Eagle2
from c2t_fast.kernels import ops
from c2t_fast.training.tree_dataset import TreeRecorder
from support import tiny_causal_lm, tiny_strategies, two_token_law


def brute_force(history, lookup):
    """The continuation after the most recent earlier occurrence of the longest matching suffix, read as
    an overlapping copy: position i of it is history[start + i], where history is extended by the copy
    itself, so a match near the end repeats with its period."""
    for n in range(min(lookup.max_ngram, len(history)), lookup.min_ngram - 1, -1):
        key = history[len(history) - n:]
        for start in range(len(history) - n - 1, -1, -1):  # occurrences that have a continuation
            if history[start:start + n] == key:
                text = list(history)
                for i in range(lookup.num_tokens):
                    text.append(text[start + n + i])
                return text[len(history):]
    return []


@pytest.mark.parametrize("seed", range(30))
def test_lookup_equals_brute_force_as_the_text_grows(seed):
    rng = random.Random(seed)
    lookup = NgramLookup(num_tokens=rng.randint(1, 6), max_ngram=rng.randint(1, 4), min_ngram=1)
    lookup.min_ngram = rng.randint(1, lookup.max_ngram)
    vocab = rng.randint(2, 6)
    history = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
    index = lookup.index(history)
    for _ in range(40):
        assert index.propose() == brute_force(history, lookup)
        new = [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
        history += new
        index.extend(new)


def test_lookup_finds_the_repeat():
    index = NgramLookup(num_tokens=3, max_ngram=2).index([5, 6, 7, 8, 9, 5, 6])
    assert index.propose() == [7, 8, 9]
    assert NgramLookup().index([1, 2, 3]).propose() == []


def test_a_run_proposes_a_full_length_branch():
    """A degenerate reply ("0111111...", seen on spec_bench alpaca) or a short cycle: the most recent match
    ends one or two tokens before the end, and the branch repeats it rather than stopping there."""
    assert NgramLookup(num_tokens=5).index([0, 1, 1, 1, 1]).propose() == [1] * 5
    assert NgramLookup(num_tokens=5, max_ngram=2).index([7, 3, 4, 3, 4]).propose() == [3, 4, 3, 4, 3]


@pytest.mark.parametrize("kwargs", [{"num_tokens": 0}, {"max_ngram": 0}, {"min_ngram": 3, "max_ngram": 2},
                                    {"num_tokens": 2.5}, {"num_tokens": True}])
def test_bad_lookup_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="NgramLookup"):
        NgramLookup(**kwargs)


def _paths(tree):
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()

    def path(i):
        return [] if i == 0 else path(parents[i]) + [tokens[i]]

    return [tuple(path(i)) for i in range(len(tokens))]


@pytest.mark.parametrize("seed", range(20))
def test_graft_hangs_the_chain_from_the_root_and_keeps_siblings_distinct(seed):
    rng = random.Random(seed)
    tokens, parents = [9], [-1]
    for i in range(1, rng.randint(1, 12)):
        p = rng.randrange(i)
        taken = {tokens[j] for j in range(1, i) if parents[j] == p}
        free = [t for t in range(6) if t not in taken]
        if not free:
            continue
        tokens.append(rng.choice(free))
        parents.append(p)
    tree = ops.Tree(torch.tensor(tokens), torch.tensor(parents, dtype=torch.int32), torch.randn(len(tokens)))
    chain = [rng.randrange(6) for _ in range(rng.randint(0, 5))]
    st = StepTree.of(tree).graft(Proposal(NGRAM, chain, list(range(-1, len(chain) - 1)), [1.0] * len(chain)))
    new, added = st.tree, st.added.get(NGRAM, 0)
    assert new.tokens[:len(tokens)].tolist() == tokens and new.parents[:len(tokens)].tolist() == parents
    paths = _paths(new)
    assert added == new.tokens.numel() - len(tokens) and len(set(paths)) == len(paths)  # siblings distinct
    assert all(tuple(chain[:k]) in paths for k in range(len(chain) + 1))  # the whole chain is a root path
    assert all(p < i for i, p in enumerate(new.parents.tolist()) if i)  # topological
    ops.build_tree(new.parents, 0)  # a valid tree for the ops


PROMPT = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, 3, 14, 15, 92, 65, 35])  # repeats: lookups succeed


@pytest.mark.parametrize("strategy", ["chain", "chain_c2t", "static", "eagle2", "c2t"])
@pytest.mark.parametrize("draft_kind", ["head", "lm"])
def test_greedy_output_with_ngram_branches_is_the_targets(strategy, draft_kind):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    torch.manual_seed(0)
    draft = (EagleDraftHead(target.config).attach(target) if draft_kind == "head"
             else DraftLM(tiny_causal_lm("llama", 4, 2, seed=2)))
    want = target.generate(PROMPT[None], do_sample=False, max_new_tokens=30, min_new_tokens=30,
                           pad_token_id=0)[0, PROMPT.numel():].tolist()
    gen = SpeculativeGenerator(target, draft, tiny_strategies(k=3, depth=2, total=10)[strategy], eos_token_id=[],
                               ngram=NgramLookup(num_tokens=6, max_ngram=3), budget=None)
    out = gen.generate(PROMPT, max_new_tokens=30)
    assert out.tokens == want
    assert out.metrics.ngram_nodes > 0  # the branches were there


@pytest.mark.slow
def test_sampling_with_ngram_branches_is_the_targets_law():
    V, N = 5, 1500
    target = tiny_causal_lm("llama", 4, 2, seed=3, vocab=V)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=4, vocab=V))
    prompt = torch.tensor([1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    gen = SpeculativeGenerator(target, draft, Eagle2(top_k=1, depth=1, total_tokens=2), eos_token_id=[],
                               ngram=NgramLookup(num_tokens=3, max_ngram=2), budget=None)
    joint = two_token_law(target, prompt, 0.8)
    counts = np.zeros(V * V)
    grafted = 0
    for seed in range(N):
        out = gen.generate(prompt, max_new_tokens=2, temperature=0.8, seed=seed)
        a, b = out.tokens[:2]
        counts[a * V + b] += 1
        grafted += out.metrics.ngram_nodes
    assert grafted > N // 2  # most steps verified an n-gram branch beside the draft's
    assert chisquare(counts, joint / joint.sum() * N).pvalue > 1e-3


def test_ngram_with_a_recorder_or_a_wrong_type_is_refused(tmp_path):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    draft = EagleDraftHead(target.config).attach(target)
    with TreeRecorder(str(tmp_path / "t")) as rec, pytest.raises(ValueError, match="without n-gram"):
        SpeculativeGenerator(target, draft, Eagle2(), recorder=rec, ngram=NgramLookup())
    for bad in ("five", -1, 2.5, True):
        with pytest.raises(TypeError, match="NgramLookup"):
            SpeculativeGenerator(target, draft, Eagle2(), ngram=bad, budget=None)
    # a token count is an NgramLookup of that many tokens, 0 none; with a recorder the default is none
    assert SpeculativeGenerator(target, draft, Eagle2(), ngram=5, budget=None).ngram.num_tokens == 5
    assert SpeculativeGenerator(target, draft, Eagle2(), ngram=0, budget=None).ngram is None
    with TreeRecorder(str(tmp_path / "u")) as rec:
        gen = SpeculativeGenerator(target, draft, Eagle2(), recorder=rec)
        assert gen.ngram is None and gen.cost_rule is None
