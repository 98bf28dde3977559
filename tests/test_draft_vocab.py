"""A restricted draft vocabulary (FR-Spec style): the head's logits are exactly the full head's columns,
every strategy builds the tree a full head would build if the other tokens were impossible, generation
stays lossless when the target emits tokens the draft cannot propose, the vocabulary survives
save/load and training, and malformed vocabularies are refused."""

import pytest
import torch

from c2t_fast.decoding.classifier import C2TClassifier
from c2t_fast.training.draft_head import DraftTrainConfig, cache_hidden_states, evaluate_draft, train_draft
from c2t_fast.decoding.drafts import EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.hf.adapter import sampling_probs
from c2t_fast.decoding.strategies import C2T, Chain, ChainC2T, Eagle2, Static
from c2t_fast.decoding.tree import TreeDrafter
from support import tiny_causal_lm

V = 97


def _ids(n, seed):
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def _head(target, seed=0):
    torch.manual_seed(seed)
    head = EagleDraftHead(target.config).attach(target)
    with torch.no_grad():  # a random head would draft near-uniformly: sharpen it so trees have structure
        head.layer.mlp.down_proj.weight.mul_(20)
    return head.eval()


class _MaskedFullHead(EagleDraftHead):
    """The full-vocabulary head with every token outside ``allowed`` made impossible (-inf logits)."""

    def _logits(self, out):
        full = self.lm_head(out).float()
        mask = torch.full((full.shape[-1],), float("-inf"))
        mask[self.allowed] = 0
        return full + mask


def _strategies():
    torch.manual_seed(0)
    clf = C2TClassifier()
    return [Chain(4), ChainC2T(clf, beta=0.3, top_m=30), Static(), Eagle2(top_k=4, depth=3, total_tokens=20),
            C2T(clf, beta=0.3, top_k=4, d_max=4, top_m=30)]


def test_restricted_logits_are_columns_of_the_full_logits():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    full = _head(target)
    part = _head(target).restrict_vocab(_ids(40, 0))
    prompt = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(3))
    feats = torch.randn(9, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for h in (full, part):
            h.prefill(prompt, feats)
        torch.testing.assert_close(part.root(5, feats[-1]), full.root(5, feats[-1])[part.vocab_ids])
        vis = torch.tensor([[True, True, False], [True, False, True]])
        toks, slots = torch.tensor([7, 11]), torch.tensor([0, 0])
        torch.testing.assert_close(part.layer_logits(toks, slots, vis), full.layer_logits(toks, slots, vis)[:, part.vocab_ids])


@pytest.mark.parametrize("strategy", _strategies(), ids=lambda s: s.name)
def test_every_strategy_builds_the_masked_full_tree(strategy):
    target = tiny_causal_lm("qwen2", 6, 2, seed=1)
    ids = _ids(50, 1)
    part = _head(target).restrict_vocab(ids)
    masked = _MaskedFullHead(target.config).attach(target).eval()
    masked.load_state_dict(_head(target).state_dict(), strict=False)
    masked.allowed = ids
    prompt = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(5))
    feats = torch.randn(10, 96, generator=torch.Generator().manual_seed(6))
    trees = []
    with torch.no_grad():
        for h in (part, masked):
            h.prefill(prompt, feats)
            trees.append(strategy.build(TreeDrafter(h, int(prompt[-1]), feats[-1])))
    a, b = trees
    assert a.tokens.numel() > 2  # a real tree, not an empty one
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
    torch.testing.assert_close(a.logp, b.logp)
    assert torch.isin(a.tokens[1:], ids).all()


@pytest.mark.parametrize("strategy", _strategies(), ids=lambda s: s.name)
def test_generation_stays_lossless_when_the_target_leaves_the_draft_vocabulary(strategy):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    prompt = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(0))
    ref = target.generate(prompt[None], do_sample=False, max_new_tokens=30, pad_token_id=0)[0, 12:].tolist()
    # the draft may propose only half of the tokens the target emits: those steps must still be exact
    emitted = sorted(set(ref))
    ids = torch.tensor(sorted(set(emitted[::2]) | set(range(0, V, 3))), dtype=torch.int64)
    assert not set(emitted) <= set(ids.tolist())
    gen = SpeculativeGenerator(target, _head(target).restrict_vocab(ids), strategy, eos_token_id=[], budget=None, ngram=None)
    out = gen.generate(prompt, max_new_tokens=30)
    assert out.tokens == ref


def test_vocabulary_survives_save_and_load(tmp_path):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    head = _head(target).restrict_vocab(_ids(33, 2))
    head.save_pretrained(str(tmp_path), dtype=torch.float16)
    loaded = EagleDraftHead.from_pretrained(str(tmp_path), target)
    assert torch.equal(loaded.vocab_ids, head.vocab_ids) and loaded.vocab_ids.dtype == torch.int64
    assert EagleDraftHead.from_pretrained(str(tmp_path), target, full_vocab=True).vocab_ids is None
    detached = EagleDraftHead.from_pretrained(str(tmp_path))  # no target yet: restricted once attached
    with pytest.raises(RuntimeError, match="not attached"):
        detached._logits(torch.zeros(1, 96))
    x = torch.randn(2, 96)
    torch.testing.assert_close(detached.attach(target)._logits(x), target.lm_head(x)[:, head.vocab_ids])


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([3, 1, 2]), "sorted and unique"),
    (torch.tensor([1, 1, 2]), "sorted and unique"),
    (torch.tensor([0, V]), r"lie in \[0, 97\)"),
    (torch.tensor([-1, 4]), r"lie in \[0, 97\)"),
    (torch.tensor([1, 2], dtype=torch.int32), "1-D int64"),
    (torch.tensor([[1, 2]]), "1-D int64"),
    (torch.tensor([], dtype=torch.int64), "non-empty"),
])
def test_malformed_vocabularies_are_refused(ids, match):
    head = _head(tiny_causal_lm("llama", 6, 2, seed=1))
    with pytest.raises(ValueError, match=match):
        head.restrict_vocab(ids)
    assert head.vocab_ids is None  # nothing half-applied


def _sequences(n, gen):
    for _ in range(n):
        x = [int(torch.randint(0, 60, (1,), generator=gen))]
        for _ in range(23):
            x.append((x[-1] + 7) % 60 if torch.rand(1, generator=gen) < 0.9 else int(torch.randint(0, 60, (1,), generator=gen)))
        yield torch.tensor(x)


@pytest.mark.parametrize("draft_vocab", [True, False])
def test_training_saves_the_loss_vocabulary_as_the_draft_vocabulary(tmp_path, draft_vocab):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    cache = str(tmp_path / "cache")
    cache_hidden_states(target, _sequences(12, torch.Generator().manual_seed(0)), cache, 288, progress=False)
    cfg = DraftTrainConfig(epochs=1, accumulate=2, loss_vocab=40, val_fraction=0.25, draft_vocab=draft_vocab)
    report = train_draft(target, cache, str(tmp_path / "head"), cfg, progress=False)
    head = EagleDraftHead.from_pretrained(str(tmp_path / "head"), target)
    if draft_vocab:
        assert head.vocab_ids.numel() == 40 and head.vocab_ids.max() < 60  # ids 60..96 never occur
        assert set(report["validation_draft_vocab"]) == {"top1", "cls", "tokens"}
    else:
        assert head.vocab_ids is None and "validation_draft_vocab" not in report


def test_restricted_evaluation_over_the_whole_vocabulary_matches_the_full_one(tmp_path):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    cache = str(tmp_path / "cache")
    cache_hidden_states(target, _sequences(4, torch.Generator().manual_seed(1)), cache, 96, progress=False)
    from c2t_fast.training.draft_head import load_cached

    data = load_cached(cache)
    head = _head(target)
    full = evaluate_draft(head, data)
    everything = evaluate_draft(head, data, torch.arange(V))
    assert full["top1"] == pytest.approx(everything["top1"])
    assert full["cls"] == pytest.approx(everything["cls"], rel=1e-5)
    few = evaluate_draft(head, data, torch.arange(0, V, 5))  # most target tokens undraftable: top-1 falls
    assert few["top1"] < full["top1"] or full["top1"] == 0


@pytest.mark.slow
def test_sampling_with_a_restricted_draft_is_the_targets_distribution():
    from scipy.stats import chisquare

    V5, N = 5, 1500
    target = tiny_causal_lm("llama", 4, 2, seed=3, vocab=V5)
    torch.manual_seed(0)
    head = EagleDraftHead(target.config).attach(target).eval().restrict_vocab(torch.tensor([0, 2, 4]))
    prompt = torch.tensor([1, 2, 3])
    gen = SpeculativeGenerator(target, head, Eagle2(top_k=2, depth=1, total_tokens=5), eos_token_id=[], budget=None, ngram=None)
    with torch.no_grad():  # the exact joint law of the first two tokens at temperature 0.8
        p1 = sampling_probs(target(prompt[None]).logits[0, -1], 0.8, 0, 1.0)[0]
        second = torch.stack([sampling_probs(target(torch.cat([prompt, torch.tensor([a])])[None]).logits[0, -1], 0.8, 0,
                                         1.0)[0] for a in range(V5)])
    joint = (p1[:, None] * second).flatten().double()
    counts = torch.zeros(V5 * V5, dtype=torch.float64)
    for seed in range(N):
        a, b = gen.generate(prompt, max_new_tokens=2, temperature=0.8, seed=seed).tokens[:2]
        counts[a * V5 + b] += 1
    assert chisquare(counts.numpy(), (joint / joint.sum() * N).numpy()).pvalue > 1e-3
    assert counts.view(V5, V5)[[1, 3]].sum() > 0  # tokens the draft cannot propose are still emitted
