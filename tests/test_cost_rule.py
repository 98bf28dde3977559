"""Trees sized by measured cost (#17): the cost profile (interpolation, measured once and cached,
refreshable), the online calibration, the per-step choice, and the engine with the rule: lossless
(greedy: the target's tokens, every strategy and draft kind, with plain-step fallback and n-gram
branches; sampling: the target's law), plain steps when no tree pays, the draft kept in sync."""

import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from c2t_fast.decoding.cost import profile as cost  # measure_costs is looked up there
from c2t_fast.decoding.cost import Calibrator, CostProfile, CostRule, load_costs, measure_costs
from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.drafts.ngram import NgramLookup
from c2t_fast.decoding.strategies import Chain, Eagle2
from c2t_fast.hf.attention import is_patched
from support import run_at_once, tiny_causal_lm, tiny_strategies, two_token_law

PROMPT = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79, 3, 14, 15, 92, 65, 35])


def flat(t1=0.1, slope=0.0):
    """A profile where T tokens cost t1 + slope * (T - 1)."""
    L = [1, 2, 4, 8, 16, 32, 64]
    return CostProfile(L, [t1 + slope * (t - 1) for t in L])


def test_profile_interpolates_and_extends():
    prof = CostProfile([1, 2, 4], [1.0, 1.5, 2.5])
    assert prof.verify(1) == 1.0 and prof.verify(3) == pytest.approx(2.0) and prof.verify(6) == pytest.approx(3.5)
    assert [r for _, _, r in prof.table()] == [1.0, 1.5, 2.5]
    noisy = CostProfile([1, 2, 4, 8], [1.0, 2.0, 1.5, 3.0])  # T = 4 measured below T = 2: never cheaper
    assert noisy.verify(4) == 2.0 and noisy.verify(3) == 2.0 and noisy.verify(6) == pytest.approx(2.5)
    for bad in (dict(lengths=[2, 4], verify_s=[1, 2]), dict(lengths=[1, 1], verify_s=[1, 2]),
                dict(lengths=[1, 2], verify_s=[1, 0]), dict(lengths=[1, 2], verify_s=[1])):
        with pytest.raises(ValueError, match="CostProfile"):
            CostProfile(**bad)


def test_costs_are_measured_once_cached_and_refreshable(tmp_path, monkeypatch):
    monkeypatch.setenv("C2T_FAST_CACHE", str(tmp_path))
    monkeypatch.delenv("C2T_FAST_COST_DIR", raising=False)
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    calls = []
    real = cost.measure_costs

    def counting(model, **kw):
        calls.append(1)
        return real(model, lengths=(1, 2, 4), context=8, repeats=2)

    monkeypatch.setattr(cost, "measure_costs", counting)
    first = load_costs(target, progress=False)
    again = load_costs(target, progress=False)
    assert len(calls) == 1 and again == first and first.lengths == [1, 2, 4] and all(s > 0 for s in first.verify_s)
    files = os.listdir(tmp_path / "cost_profiles")
    assert files == [f"{first.key}.json"] and json.loads((tmp_path / "cost_profiles" / files[0]).read_text())["key"]
    load_costs(target, refresh=True, progress=False)
    assert len(calls) == 2
    (tmp_path / "cost_profiles" / files[0]).write_text("{not json")  # damaged: measured again
    load_costs(target, progress=False)
    assert len(calls) == 3
    other = tiny_causal_lm("llama", 4, 2, seed=1)  # another model: another key
    assert cost.profile_key(other, torch.device("cpu")) != first.key


def test_measured_verification_leaves_the_cache_as_it_was():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    prof = measure_costs(target, lengths=(1, 3), context=5, repeats=1)
    assert prof.lengths == [1, 3] and len(prof.verify_s) == 2 and prof.hardware


def test_calibration_starts_at_the_raw_score_and_learns():
    cal = Calibrator()
    raw = torch.tensor([0.005, 0.55, 0.97])
    assert torch.allclose(cal(raw), torch.tensor([0.005, 0.55, 0.975]), atol=0.01)
    cal.update(torch.full((200,), 0.55), torch.zeros(200, dtype=torch.bool))  # 0.55 never accepted
    assert cal(torch.tensor([0.55]))[0] < 0.02 and cal(torch.tensor([0.97]))[0] > 0.9  # other bins untouched


def test_choice_pays_for_what_it_verifies():
    p = torch.tensor([0.9, 0.8, 0.1, 0.05])
    assert CostRule(flat(0.1, 0.0)).choose(p, 0.0)[0] == 4  # verification free at the margin: everything
    m, rate = CostRule(flat(0.1, 0.02)).choose(p, 0.0)  # 0.02 s per token: 0.9, 0.8 pay, 0.1 does not
    assert m == 2 and rate == pytest.approx(2.7 / 0.14)
    assert CostRule(flat(0.1, 1.0)).choose(p, 0.0)[0] == 0  # nothing pays: the root alone


def test_rule_goes_plain_when_drafting_loses_and_probes_again():
    rule = CostRule(flat(0.1, 0.0), probe_every=2, max_plain=8)
    rule.after_step(expected_rate=5.0)  # below plain decoding's 10 tok/s
    assert [rule.take_plain_step() for _ in range(3)] == [True, True, False]
    rule.after_step(expected_rate=5.0)  # the probe lost again: twice as long
    assert sum(rule.take_plain_step() for _ in range(10)) == 4
    rule.after_step(expected_rate=20.0)  # a probe that wins keeps drafting
    assert not rule.take_plain_step()
    with pytest.raises(ValueError, match="probe_every"):
        CostRule(flat(), probe_every=0)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="draft_cost"):
            CostRule(flat(), draft_cost=bad)
    p = torch.tensor([0.9, 0.8])  # a slow draft makes the same tree pay less; a pinned cost ignores the clock
    assert CostRule(flat(0.1, 0.02)).choose(p, 1.0)[1] < CostRule(flat(0.1, 0.02)).choose(p, 0.0)[1]
    pinned = CostRule(flat(0.1, 0.02), draft_cost=0.0)
    assert pinned.choose(p, 1.0) == pinned.choose(p, 0.0) == CostRule(flat(0.1, 0.02)).choose(p, 0.0)


def _draft(kind, target):
    torch.manual_seed(0)
    if kind == "head":
        return EagleDraftHead(target.config).attach(target)
    return DraftLM(tiny_causal_lm("llama", 4, 2, seed=2))


@pytest.mark.parametrize("strategy", ["chain", "chain_c2t", "static", "eagle2", "c2t"])
@pytest.mark.parametrize("draft_kind", ["head", "lm", "self"])
@pytest.mark.parametrize("profile", ["cheap", "steep", "plain"])
def test_greedy_output_under_the_cost_rule_is_the_targets(strategy, draft_kind, profile):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    draft = DraftLM(target) if draft_kind == "self" else _draft(draft_kind, target)
    want = target.generate(PROMPT[None], do_sample=False, max_new_tokens=30, min_new_tokens=30,
                           pad_token_id=0)[0, PROMPT.numel():].tolist()
    prof = {"cheap": flat(0.1, 0.001), "steep": flat(0.1, 0.03), "plain": flat(0.1, 10.0)}[profile]
    rule = CostRule(prof, probe_every=2, max_plain=4, draft_cost=0.001)  # not the drafting's wall time: load-free
    gen = SpeculativeGenerator(target, draft, tiny_strategies(k=3, depth=2, total=10)[strategy], eos_token_id=[],
                               budget=rule, ngram=NgramLookup(num_tokens=4, max_ngram=3))
    out = gen.generate(PROMPT, max_new_tokens=30)
    assert out.tokens == want
    m = out.metrics
    if profile == "plain":  # no tree pays: every step after a losing probe is a plain step
        assert m.plain_steps > m.steps // 2 and max(m.draft_tokens) == 0
    if profile == "cheap" and draft_kind == "self" and strategy in ("chain", "static", "eagle2"):
        # the target drafting for itself: its raw probabilities are low (a random tiny model), so the
        # first trees are cut short; the calibration learns that its nodes are always accepted
        assert m.tau > 1 and min(m.accepted[-3:]) >= 2


def test_the_draft_follows_the_text_through_plain_steps():
    """After plain steps the draft's context is the text: a self-draft accepts its whole chain again."""
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    rule = CostRule(flat(10.0, 0.0), probe_every=3, max_plain=3, draft_cost=0.0)  # a plain step "costs" 10 s
    rule.after_step(0.0)  # start with 3 plain steps
    gen = SpeculativeGenerator(target, DraftLM(target), Chain(3), eos_token_id=[], budget=rule, ngram=None)
    rule.reset = lambda: None  # keep the forced plain steps for this run
    out = gen.generate(PROMPT, max_new_tokens=20)
    assert out.metrics.plain_steps == 3
    assert out.metrics.accepted[3:] == [3] * len(out.metrics.accepted[3:])  # every later chain fully accepted


def test_budget_is_checked_and_auto_measures_before_anything_changes(tmp_path, monkeypatch):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    draft = _draft("head", target)
    with pytest.raises(ValueError, match="budget"):
        SpeculativeGenerator(target, draft, Chain(2), budget="fast", ngram=None)

    def broken(model, **kw):
        raise RuntimeError("no timer")

    monkeypatch.setenv("C2T_FAST_CACHE", str(tmp_path))
    monkeypatch.delenv("C2T_FAST_COST_DIR", raising=False)
    monkeypatch.setattr(cost, "measure_costs", broken)
    with pytest.raises(RuntimeError, match="no timer"):
        SpeculativeGenerator(target, draft, Chain(2), budget="auto", ngram=None)
    assert not is_patched(target)  # a failed construction leaves the target as it was
    monkeypatch.setattr(cost, "measure_costs", lambda m, **kw: flat())
    gen = SpeculativeGenerator(target, draft, Chain(2), budget="auto", ngram=None)
    assert isinstance(gen.cost_rule, CostRule) and gen.cost_rule.profile == flat()


@pytest.mark.slow
def test_sampling_under_the_cost_rule_is_the_targets_law():
    V, N = 5, 1500
    target = tiny_causal_lm("llama", 4, 2, seed=3, vocab=V)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=4, vocab=V))
    prompt = torch.tensor([1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])

    class PlainFirst(CostRule):
        def reset(self):
            super().reset()
            self.account = -1e9  # in debt: the first step after the prefill is a plain step (no n-gram tree)

    # one generator whose trees the rule cuts (0.04 s per verified token), one whose step is plain
    gens = [SpeculativeGenerator(target, draft, Eagle2(top_k=2, depth=1, total_tokens=5), eos_token_id=[],
                                 budget=rule, ngram=NgramLookup(num_tokens=3, max_ngram=2))
            for rule in (CostRule(flat(0.1, 0.04), draft_cost=0.0), PlainFirst(flat(0.1, 0.04), draft_cost=0.0))]
    joint = two_token_law(target, prompt, 0.8)
    counts = np.zeros(V * V)
    cut = plain = 0
    for seed in range(N):
        out = gens[seed % 2].generate(prompt, max_new_tokens=2, temperature=0.8, seed=seed)
        a, b = out.tokens[:2]
        counts[a * V + b] += 1
        plain += seed % 2 == 1 and out.metrics.plain_steps
        cut += seed % 2 == 0 and out.metrics.draft_tokens[0] < 5  # fewer than the whole tree
    assert plain == N // 2 and cut > N // 10
    assert chisquare(counts, joint / joint.sum() * N).pvalue > 1e-3


@pytest.mark.parametrize("loss", [0.002, 0.03, 0.3])
def test_probes_pay_from_their_own_account(loss):
    """A draft that never pays: whatever each speculative step loses against a plain step, the losses stay
    within loss_share of the time (and one step), so the run is >= 0.97x plain decoding."""
    rule = CostRule(flat(0.1, 0.0), probe_every=1, max_plain=1, margin=1e-9)  # never goes plain by itself
    rule.reset()
    plain_s, spent, tokens = 0.1, 0.0, 0
    for _ in range(3000):
        plain = rule.take_plain_step()
        step = plain_s if plain else plain_s + loss  # one token either way: speculation only costs
        rule.settle(step, 1, plain)
        spent += step
        tokens += 1
    assert rule.account >= -rule.loss_share * rule.elapsed - loss - 1e-9
    assert (tokens * plain_s) / spent >= 1 - rule.loss_share - loss / spent  # >= 0.97x plain decoding, one step aside


def test_a_paying_draft_is_never_held_back_by_the_account():
    rule = CostRule(flat(0.1, 0.0), probe_every=1, max_plain=1, margin=1e-9)
    rule.reset()
    plain_steps = 0
    for _ in range(200):
        plain = rule.take_plain_step()
        plain_steps += plain
        rule.settle(0.12 if not plain else 0.1, 1 if plain else 3, plain)  # 3 tokens for 1.2x the time
    assert plain_steps == 0 and rule.account > 0


def test_the_account_is_machine_independent_with_a_fixed_draft_cost():
    rule = CostRule(flat(0.1, 0.01), draft_cost=0.05)
    rule.reset()
    rule.settle(123.0, 2, False, verified=5)  # the measured time is ignored: 0.05 + verify(5) is charged
    assert rule.elapsed == pytest.approx(0.05 + rule.profile.verify(5))
    assert rule.account == pytest.approx(2 * rule.profile.verify(1) - rule.elapsed)
    with pytest.raises(ValueError, match="loss_share"):
        CostRule(flat(0.1, 0.01), loss_share=1.5)


def test_a_backed_off_draft_leaves_the_free_branches_and_follows_their_text():
    """Steps the draft sits out still verify the training-free sources' tree (no draft call); afterwards
    the draft has read that text: a self-draft accepts its whole chain again."""
    rule = CostRule(flat(10.0, 0.0), probe_every=3, max_plain=3, draft_cost=0.0)
    assert rule.step_mode(True, True) == "draft" and rule.step_mode(False, True) == "sources"
    rule.after_step(0.0)
    assert [rule.step_mode(True, True) for _ in range(3)] == ["sources"] * 3 and rule.step_mode(True, True) == "draft"
    rule.after_step(0.0)
    assert rule.step_mode(True, False) == "plain"  # no sources: the same step is plain
    rule.account = -1.0
    rule.elapsed = 1.0
    assert rule.step_mode(True, True) == "plain"  # in debt: nothing speculative at all
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    rule = CostRule(flat(10.0, 0.0), probe_every=3, max_plain=3, draft_cost=0.0)
    rule.after_step(0.0)
    gen = SpeculativeGenerator(target, DraftLM(target), Chain(3), eos_token_id=[], budget=rule, ngram=2)
    rule.reset = lambda: None
    out = gen.generate(PROMPT, max_new_tokens=24)
    assert out.tokens == target.generate(PROMPT[None], do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                         pad_token_id=0)[0, PROMPT.numel():].tolist()
    assert min(out.metrics.accepted[3:]) >= 3  # every later chain of the self-draft fully accepted


def test_first_runs_at_once_and_damaged_profiles(tmp_path, monkeypatch):
    """Several processes (here threads) measuring on an empty cache each finish with a profile; a profile
    file that parses but is not a profile is measured again."""
    import time as _time

    monkeypatch.setenv("C2T_FAST_COST_DIR", str(tmp_path / "p"))
    target = tiny_causal_lm("llama", 6, 2, seed=1)

    def slow(model, **kw):
        _time.sleep(0.2)  # every thread is measuring when the first one writes
        return CostProfile([1, 2], [0.1, 0.2], key=cost.profile_key(model, torch.device("cpu")))

    monkeypatch.setattr(cost, "measure_costs", slow)
    out, errors = run_at_once(lambda: load_costs(target, progress=False), 6)
    assert not errors and len(out) == 6 and os.listdir(tmp_path / "p") == [f"{out[0].key}.json"]
    path = tmp_path / "p" / f"{out[0].key}.json"
    for bad in ('{"lengths": "x", "verify_s": 1}', '{"lengths": [1, 2], "verify_s": [-1, 0.2]}', "[]",
                '{"lengths": [1, 2], "verify_s": [NaN, 0.2]}', '{"lengths": [2, 1], "verify_s": [0.1, 0.2]}'):
        path.write_text(bad)
        assert load_costs(target, progress=False).verify_s == [0.1, 0.2]


def test_a_draft_whose_steps_emit_slower_than_the_free_branches_alone_is_probed_not_run():
    """Realized rates decide between draft and sources steps: after one of each, a draft losing to the
    sources runs only as probes after 4, 8, 16 sources steps; a draft that wins runs every step again."""
    rule = CostRule(flat(0.1, 0.001), probe_every=4, max_plain=16)

    def step(mode, emitted, seconds):
        rule.settle(seconds, emitted, False, 5, mode)

    assert rule.step_mode(True, True) == "draft"
    step("draft", 2, 0.2)  # 10 tokens/s
    assert rule.step_mode(True, True) == "sources"  # no sources rate yet: measure one
    step("sources", 3, 0.1)  # 30 tokens/s
    modes = []
    for _ in range(40):
        mode = rule.step_mode(True, True)
        modes.append(mode)
        step(mode, 2 if mode == "draft" else 3, 0.2 if mode == "draft" else 0.1)
    draft_at = [i for i, m in enumerate(modes) if m == "draft"]
    assert draft_at[:3] == [0, 5, 14] and len(draft_at) == 4  # probes after 4, 8, 16 (capped) sources steps
    rule = CostRule(flat(0.1, 0.001), probe_every=4, max_plain=16)
    step("draft", 4, 0.1)  # 40 tokens/s
    assert rule.step_mode(True, True) == "sources"
    step("sources", 1, 0.1)  # 10 tokens/s: the draft wins
    assert [rule.step_mode(True, True) for _ in range(5)] == ["draft"] * 5
    assert rule.step_mode(True, False) == "draft"  # without sources nothing changes


def test_the_draft_and_sources_rates_outlive_a_generation():
    """A draft that lost to the free branches in one generation is still probed, not run, in the next one
    (reset clears the generation's account, not what the draft was worth); a fresh rule measures anew."""
    rule = CostRule(flat(0.1, 0.001), probe_every=4, max_plain=16)
    rule.settle(0.2, 2, False, 5, "draft")  # 10 tokens/s
    assert rule.step_mode(True, True) == "sources"
    rule.settle(0.1, 3, False, 5, "sources")  # 30 tokens/s
    assert rule.step_mode(True, True) == "draft"
    rule.settle(0.2, 2, False, 5, "draft")  # loses again: 4 sources steps before the next probe
    rule.settle(0.1, 0, True, 1, None)
    rule.reset()
    assert rule.account == 0.0 and rule.elapsed == 0.0 and rule.plain_s is None
    assert [rule.step_mode(True, True) for _ in range(5)] == ["sources"] * 4 + ["draft"]
    assert CostRule(flat(0.1, 0.001)).rate == {"draft": None, "sources": None}
