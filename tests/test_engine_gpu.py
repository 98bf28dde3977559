"""The engine end to end on a real GPU (skipped without one; benchmarks/gpu/run.sh runs it): every
strategy and draft on a tiny random Llama / Qwen2 on CUDA, the tree ops through their CUDA kernels,
greedy output equal to the target's own generate(do_sample=False), sampling runs (seeded, repeatable)."""

import pytest
import torch

from c2t_fast import ops
from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.drafts.ngram import NgramLookup
from support import tiny_causal_lm, tiny_strategies

pytestmark = pytest.mark.gpu
PROMPT = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(0))


def _strategy(name):
    return tiny_strategies()[name]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("draft_kind", ["head", "head_vocab", "lm", "self"])
@pytest.mark.parametrize("strategy", ["chain", "chain_c2t", "static", "eagle2", "c2t"])
def test_engine_on_cuda_is_lossless(family, draft_kind, strategy):
    assert ops.cuda_kernels_compiled(), "build with C2T_FAST_CUDA=1: the tree ops must run their CUDA kernels"
    target = tiny_causal_lm(family, 6, 2, seed=1).cuda()
    if draft_kind.startswith("head"):
        draft = EagleDraftHead(target.config).cuda().attach(target)
        if draft_kind == "head_vocab":
            draft.restrict_vocab(torch.arange(0, 97, 2))
    else:
        draft = DraftLM(tiny_causal_lm(family, 4 if draft_kind == "lm" else 6, 2, seed=2 if draft_kind == "lm" else 1)
                        .cuda())
    gen = SpeculativeGenerator(target, draft, _strategy(strategy), eos_token_id=[], budget=None, ngram=None)
    out = gen.generate(PROMPT, max_new_tokens=40)
    ids = PROMPT.cuda()[None]
    want = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                           eos_token_id=None, pad_token_id=0)[0, PROMPT.numel():].tolist()
    assert out.tokens == want
    if draft_kind == "self" and strategy in ("chain", "static"):
        assert out.metrics.tau > 2
    a = gen.generate(PROMPT, max_new_tokens=24, temperature=1.0, top_p=0.9, seed=11).tokens
    b = gen.generate(PROMPT, max_new_tokens=24, temperature=1.0, top_p=0.9, seed=11).tokens
    assert a == b and len(a) == 24 and all(0 <= t < 97 for t in a)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_published_heads_and_the_generate_front_door_on_cuda(tmp_path, kind):
    import c2t_fast
    from c2t_fast.decoding.drafts.loading import load_draft
    from test_hub_heads import write_eagle1, write_eagle3

    target = tiny_causal_lm("llama", 6, 2, seed=1, layers=6).cuda()
    (write_eagle1 if kind == "eagle1" else write_eagle3)(tmp_path / "h", target)
    head = load_draft(str(tmp_path / "h"), target)  # on the target's device
    ids = PROMPT.cuda()[None]
    want = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                           eos_token_id=None, pad_token_id=0)
    for name in ("chain", "eagle2", "c2t"):
        gen = SpeculativeGenerator(target, head, _strategy(name), eos_token_id=[], budget=None, ngram=None)
        assert gen.generate(PROMPT, max_new_tokens=30).tokens == want[0, PROMPT.numel():].tolist()
    # n-gram branches grafted onto the tree on the GPU (decoding/ngram.py builds them on the tree's device)
    gen = SpeculativeGenerator(target, head, _strategy("c2t"), eos_token_id=[], ngram=NgramLookup(num_tokens=4), budget=None)
    assert gen.generate(PROMPT, max_new_tokens=30).tokens == want[0, PROMPT.numel():].tolist()
    plain = target.generate(ids, do_sample=False, max_new_tokens=30, pad_token_id=0)
    got = target.generate(ids, do_sample=False, max_new_tokens=30, pad_token_id=0, custom_generate=c2t_fast.generate,
                          draft=head, strategy=_strategy("c2t"))
    assert got.tolist() == plain.tolist()


@pytest.mark.parametrize("strategy", ["chain", "eagle2", "c2t"])
def test_cost_rule_and_a_trained_eagle3_head_on_cuda(tmp_path, monkeypatch, strategy):
    """budget="auto" measures the verification cost on the GPU (synchronised timings, cached), cuts the
    trees there and runs plain steps; an EAGLE-3 head in our saved layout, loaded onto the GPU, drafts."""
    from c2t_fast.decoding.cost import CostRule, load_costs
    from c2t_fast.decoding.drafts import eagle3_feature_layers
    from c2t_fast.decoding.drafts.loading import load_draft
    from c2t_fast.training.eagle3_head import new_eagle3_head

    monkeypatch.setenv("C2T_FAST_CACHE", str(tmp_path))
    monkeypatch.delenv("C2T_FAST_COST_DIR", raising=False)
    target = tiny_causal_lm("llama", 6, 2, seed=1, layers=8).cuda()
    prof = load_costs(target, progress=False)
    assert prof.lengths[0] == 1 and all(s > 0 for s in prof.verify_s)
    head = new_eagle3_head(target, torch.arange(0, 97, 3), eagle3_feature_layers(8))
    head.save_pretrained(str(tmp_path / "e3"))
    head = load_draft(str(tmp_path / "e3"), target)
    assert next(head.parameters()).is_cuda
    ids = PROMPT.cuda()[None]
    want = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                           eos_token_id=None, pad_token_id=0)[0, PROMPT.numel():].tolist()
    for budget in ("auto", CostRule(prof, probe_every=1, max_plain=2, margin=100.0)):  # the second: mostly plain
        gen = SpeculativeGenerator(target, head, _strategy(strategy), eos_token_id=[], budget=budget,
                                   ngram=NgramLookup(num_tokens=4))
        out = gen.generate(PROMPT, max_new_tokens=30)
        assert out.tokens == want
    assert out.metrics.plain_steps > 0
