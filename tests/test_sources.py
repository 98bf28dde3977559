"""Training-free draft sources: the datastore's lookup against brute force (longest matching suffix, its
continuations' counts, document boundaries), its cached index, the recycling table, and the engine with
every source alone (no draft) and beside a draft: greedy output equal to generate(), sampling the
target's law, the cost rule sizing source nodes by their own calibrated scores."""

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from c2t_fast.decoding.drafts.datastore import SEP, Datastore, load_datastore
from c2t_fast.decoding.drafts import DraftLM
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.drafts.recycling import RecyclingTable
from c2t_fast.decoding.strategies import Eagle2
from support import tiny_causal_lm, tiny_strategies, two_token_law


def _corpus(rng, n=3000, vocab=12, docs=20):
    toks = [rng.randrange(vocab) for _ in range(n)]
    for _ in range(docs):
        toks[rng.randrange(n)] = SEP
    for _ in range(30):  # repeated phrases: long matches exist
        a, b = rng.randrange(n - 20), rng.randrange(n - 20)
        toks[b:b + 12] = toks[a:a + 12]
    return np.array(toks, dtype=np.uint16)


def _brute(tokens, ctx, key_len, depth):
    t = tokens.tolist()
    for m in range(min(key_len, len(ctx)), 1, -1):
        q = ctx[len(ctx) - m:]
        starts = [i for i in range(len(t) - m + 1) if t[i:i + m] == q]
        if starts:
            conts = []
            for s in starts:
                c = []
                for x in t[s + m:s + m + depth]:
                    if x == SEP:
                        break
                    c.append(x)
                conts.append(tuple(c))
            return m, conts
    return None


@pytest.mark.parametrize("seed", range(8))
def test_lookup_equals_brute_force(seed):
    rng = random.Random(seed)
    tokens = _corpus(rng)
    store = Datastore(tokens, key_len=8)
    for _ in range(25):
        i = rng.randrange(10, tokens.size)
        ctx = [x for x in tokens[i - rng.randint(2, 10):i].tolist() if x != SEP] or [1, 2]
        if rng.random() < 0.3:
            ctx = ctx + [rng.randrange(12)]
        found, want = store.lookup(ctx, depth=4, max_nodes=1000, max_occurrences=4096), _brute(tokens, ctx, 8, 4)
        if want is None:
            assert found is None
            continue
        m, conts = want
        if not any(conts):  # every occurrence ends a document: nothing to propose
            assert found is None
            continue
        assert found.match == m and found.occurrences == len(conts)
        counts = {}
        for c in conts:
            for k in range(1, len(c) + 1):
                counts[c[:k]] = counts.get(c[:k], 0) + 1
        paths = []
        for tok, par in zip(found.tokens, found.parents):
            paths.append((paths[par] if par >= 0 else ()) + (tok,))
        assert {p: c for p, c in zip(paths, found.counts)} == counts
        for p, c, share in zip(paths, found.counts, found.share):
            parent = counts[p[:-1]] if len(p) > 1 else len(conts)
            assert share == pytest.approx(c / parent)


def test_lookup_keeps_the_most_frequent_paths_and_spreads_its_sample():
    tokens = np.array([1, 2, 3, 4] * 50 + [SEP] + [1, 2, 3, 9] * 5, dtype=np.uint16)
    store = Datastore(tokens, key_len=4)
    found = store.lookup([7, 1, 2], depth=3, max_nodes=2, max_occurrences=1000)
    assert found.match == 2 and found.tokens == [3, 4] and found.parents == [-1, 0]  # 3 then the common 4
    sampled = store.lookup([1, 2], depth=2, max_nodes=8, max_occurrences=11)
    assert sampled.occurrences == 55 and sum(c for c, p in zip(sampled.counts, sampled.parents) if p < 0) == 11
    assert store.lookup([5, 6], depth=2) is None and store.lookup([1], depth=2) is None  # min_match 2


def test_datastore_index_is_cached_and_bad_corpora_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("C2T_FAST_CACHE", str(tmp_path / "cache"))
    tokens = _corpus(random.Random(0))
    d = tmp_path / "ds"
    d.mkdir()
    np.save(d / "tokens.npy", tokens)
    a = load_datastore(str(d))
    b = load_datastore(str(d))  # from the cache
    assert np.array_equal(a.order, b.order) and len(list((tmp_path / "cache" / "datastore_index").iterdir())) == 1
    np.save(d / "tokens.npy", tokens.astype(np.int32))
    with pytest.raises(ValueError, match="uint16"):
        load_datastore(str(d))
    with pytest.raises(FileNotFoundError, match="build-datastore"):
        load_datastore(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="key_len"):
        Datastore(tokens, key_len=1)


def test_recycling_table_follows_the_latest_verification():
    table = RecyclingTable(10, k=3, widths=(2, 1))
    logits = torch.full((2, 10), -10.0)
    logits[0, 4], logits[0, 5], logits[1, 7] = 3.0, 2.0, 5.0
    table.observe(torch.tensor([1, 4]), logits)
    toks, parents, probs = table.propose(1)
    assert toks[:2] == [4, 5] and parents[:2] == [-1, -1] and toks[2] == 7 and parents[2] == 0
    assert probs[0] > probs[1] and 0 < probs[2] <= 1
    assert table.propose(9) == ([], [], [])  # never observed
    with pytest.raises(ValueError):
        RecyclingTable(10, k=3, widths=(4,))


def _store_for(target, prompt, n=60):
    """A datastore of the target's own greedy text after a few prompts (what build-datastore would hold)."""
    texts = []
    for s in range(6):
        p = torch.cat([prompt[:4], torch.tensor([s])])
        with torch.no_grad():
            texts.append(target.generate(p[None], do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                         pad_token_id=0)[0].tolist())
    flat = []
    for t in texts:
        flat += t + [SEP]
    return Datastore(np.array(flat, dtype=np.uint16), key_len=6)


PROMPT = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, 3, 14, 15, 92])


@pytest.mark.parametrize("combo", ["datastore", "recycling", "ngram", "all"])
@pytest.mark.parametrize("budget", [None, "rule"])
def test_training_free_sources_alone_are_lossless(combo, budget):
    from c2t_fast.decoding.cost import CostProfile, CostRule

    target = tiny_causal_lm("llama", 6, 2, seed=1)
    store = _store_for(target, PROMPT)
    kw = {"datastore": store if combo in ("datastore", "all") else None,
          "recycling": combo in ("recycling", "all"), "ngram": 4 if combo in ("ngram", "all") else None}
    rule = CostRule(CostProfile([1, 2, 64], [0.1, 0.1, 0.2]), draft_cost=0.0) if budget else None
    gen = SpeculativeGenerator(target, None, eos_token_id=[], budget=rule, **kw)
    want = target.generate(PROMPT[None], do_sample=False, max_new_tokens=40, min_new_tokens=40,
                           pad_token_id=0)[0, PROMPT.numel():].tolist()
    for _ in range(2):  # the second run starts from a warm recycling table
        out = gen.generate(PROMPT, max_new_tokens=40)
        assert out.tokens == want
    m = out.metrics
    assert m.tau > 0.5 and sum(m.source_accepted.values()) == sum(m.accepted)
    assert set(m.source_nodes) <= {"ngram", "datastore", "recycling"} and m.source_nodes


@pytest.mark.parametrize("strategy", ["chain", "eagle2", "c2t"])
def test_sources_beside_a_draft_are_lossless(strategy):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=2))
    gen = SpeculativeGenerator(target, draft, tiny_strategies(k=3, depth=2, total=10)[strategy], eos_token_id=[],
                               budget=None, ngram=4, datastore=_store_for(target, PROMPT), recycling=True)
    want = target.generate(PROMPT[None], do_sample=False, max_new_tokens=30, min_new_tokens=30,
                           pad_token_id=0)[0, PROMPT.numel():].tolist()
    out = gen.generate(PROMPT, max_new_tokens=30)
    assert out.tokens == want
    assert {"datastore", "recycling"} <= set(out.metrics.source_nodes)


@pytest.mark.slow
def test_sampling_with_every_source_is_the_targets_law():
    V, N = 5, 1500
    target = tiny_causal_lm("llama", 4, 2, seed=3, vocab=V)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=4, vocab=V))
    prompt = torch.tensor([1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    store = Datastore(np.array([1, 2, 3, 4, 0] * 20 + [2, 2, 1, 0] * 10, dtype=np.uint16), key_len=4)
    gen = SpeculativeGenerator(target, draft, Eagle2(top_k=1, depth=1, total_tokens=2), eos_token_id=[], budget=None,
                               ngram=3, datastore=store, recycling=RecyclingTable(V, k=2, widths=(2, 1)))
    joint = two_token_law(target, prompt, 0.8)
    counts = np.zeros(V * V)
    for seed in range(N):
        a, b = gen.generate(prompt, max_new_tokens=2, temperature=0.8, seed=seed).tokens[:2]
        counts[a * V + b] += 1
    assert chisquare(counts, joint / joint.sum() * N).pvalue > 1e-3


def test_refusals():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    with pytest.raises(ValueError, match="training-free sources alone"):
        SpeculativeGenerator(target, None, ngram=None)
    with pytest.raises(TypeError, match="datastore"):
        SpeculativeGenerator(target, None, datastore=[1, 2, 3])
    with pytest.raises(TypeError, match="recycling"):
        SpeculativeGenerator(target, None, recycling="yes")
