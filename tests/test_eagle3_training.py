"""EAGLE-3-style head training: the training-time-test forward equals the head's inference path step
for step (both head kinds), the losses fall on a learnable language, resume after an interruption, the
saved head loads through ``load_draft`` and drafts losslessly, and the chain acceptance metric."""

import json
import os

import pytest
import torch

from c2t_fast.decoding.drafts import EagleDraftHead
from c2t_fast.decoding.drafts import Eagle3DraftHead, eagle3_feature_layers
from c2t_fast.decoding.drafts.loading import load_draft
from c2t_fast.hf.adapter import TargetAdapter
from c2t_fast.training.draft_head import cache_hidden_states
from c2t_fast.training.eagle3_head import (Eagle3TrainConfig, chain_acceptance, draft_vocabulary, new_eagle3_head,
                                           train_eagle3, unrolled_logits)
from support import tiny_causal_lm

LAYERS = 8  # feature layers (2, 4, 5)


def _target(seed=1):
    return tiny_causal_lm("llama", 6, 2, seed=seed, layers=LAYERS)


def _sequences(target, n, gen, prompt=6, reply=18):
    # the target's own greedy replies to random prompts (distilled data); the prompt is context only
    # (loss_from = prompt - 1). Every 4th reply is sampled instead and marked so.
    for k in range(n):
        p = torch.randint(0, 97, (1, prompt), generator=gen)
        sampled = k % 4 == 3
        torch.manual_seed(k)
        with torch.no_grad():
            out = target.generate(p, do_sample=sampled, max_new_tokens=reply, min_new_tokens=reply, pad_token_id=0,
                                  top_k=None)[0]
        yield out, prompt - 1, {"sampled": sampled}


def _perturbed(head):
    # a trained head is not the fresh one's near-identity: randomise every weight so a wrong mask,
    # position or feature path shows in the logits
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if not name.startswith(("embed_tokens", "lm_head")) or isinstance(head, Eagle3DraftHead):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return head


def _cached(target, tmp_path, n=12):
    cache = str(tmp_path / "cache")
    cache_hidden_states(target, _sequences(target, n, torch.Generator().manual_seed(0)), cache, 10_000, shard_size=4,
                        progress=False, feature_layers=eagle3_feature_layers(LAYERS))
    return cache


@pytest.mark.parametrize("kind", ["eagle3", "eagle1", "eagle3_restricted", "eagle3_two_layers"])
def test_unrolled_steps_equal_the_inference_chain(kind):
    target = _target()
    adapter = TargetAdapter(target)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (20,), generator=gen)
    layers = eagle3_feature_layers(LAYERS)
    with torch.no_grad():
        hidden, aux = adapter.hidden_and_features(ids, layers)
    if kind == "eagle1":
        head = _perturbed(EagleDraftHead(target.config).attach(target)).eval()
        feats = hidden
    else:
        vocab = torch.arange(97) if kind == "eagle3" else torch.randperm(97, generator=gen)[:40].sort().values
        head = _perturbed(new_eagle3_head(target, vocab, layers, extra_layers=int(kind.endswith("two_layers")))).eval()
        feats = aux
    steps, rows_from = 4, 5
    with torch.no_grad():
        unrolled = unrolled_logits(head, ids, feats, steps, rows_from)
        for t in (rows_from, 9, 14):  # pair t: token t+1 with the feature of t
            P = t + 1
            head.prefill(ids[:P], feats[:P])
            chain = [head.root(int(ids[P]), feats[P - 1])]
            for i in range(1, steps):
                visible = torch.ones(1, i + 1, dtype=torch.bool)
                visible[0, :i] = True
                chain.append(head.layer_logits(ids[P + i].view(1), torch.tensor([i - 1]), visible)[0])
            for i in range(steps):
                torch.testing.assert_close(unrolled[i][t - rows_from], chain[i], rtol=1e-4, atol=1e-4,
                                           msg=f"step {i} at pair {t}")


def test_train_resume_save_load_and_draft(tmp_path):
    target = _target()
    cache = _cached(target, tmp_path, n=24)
    with open(os.path.join(cache, "meta.json")) as f:
        assert json.load(f)["feature_layers"] == list(eagle3_feature_layers(LAYERS))
    cfg = Eagle3TrainConfig(epochs=12, lr=3e-3, accumulate=2, save_every=3, draft_vocab=60, val_fraction=0.2,
                            eval_every=20, probe_init=False)  # from the plain start: the losses must fall
    out = str(tmp_path / "head")
    report = train_eagle3(target, cache, out, cfg, progress=False)
    hist = report["history"]
    first, last = hist[0], hist[-1]
    assert last["loss"] < first["loss"] and all(b < a for a, b in zip(first["ce"], last["ce"]))
    from c2t_fast.training.draft_head import load_cached, split_validation

    train, val = split_validation(load_cached(cache), 0.2)
    fresh = chain_acceptance(new_eagle3_head(target, draft_vocabulary(train, 60)[0], eagle3_feature_layers(LAYERS)), val)
    acc = report["validation"]
    # learnt to mimic the target (seed 1: 0.31 / 0.81 expected accepted of 3, fresh 0.15 / 0.15)
    assert acc["chain"][0] >= 0.2 and acc["expected_accepted"] > fresh["expected_accepted"] + 0.3
    assert acc["chain"][1] <= acc["chain"][0] and acc["conditional"][1] == pytest.approx(acc["chain"][1] / acc["chain"][0])
    assert os.path.isfile(os.path.join(out, "training.png")) and not os.path.isfile(os.path.join(out, "checkpoint.pt"))
    assert [e["step"] for e in report["evals"]] == [20, 40, 60, 80, 100, 120]  # 12 epochs x 10 steps
    assert [e["trained_positions"] for e in report["evals"]] == [e["step"] * 2 * 18 for e in report["evals"]]
    with open(os.path.join(out, "config.json")) as f:
        raw = json.load(f)
    assert raw["draft_type"] == "eagle3" and raw["draft_vocab_size"] == 60
    head = load_draft(out, target)
    assert isinstance(head, Eagle3DraftHead) and head.vocab_ids.numel() == 60
    assert chain_acceptance(head, val, 3)["chain"] == pytest.approx(acc["chain"], abs=1e-6)  # saved = trained

    # lossless through the engine, greedy
    from c2t_fast.decoding.engine import SpeculativeGenerator
    from c2t_fast.decoding.strategies import Chain

    prompt = torch.tensor([5, 12, 19, 26, 33, 40])
    with torch.no_grad():
        want = target.generate(prompt[None], do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               pad_token_id=0)[0, 6:].tolist()
    assert SpeculativeGenerator(target, head, Chain(3), eos_token_id=[], budget=None, ngram=None).generate(prompt, 12).tokens == want


def test_training_resumes_after_an_interruption(tmp_path, monkeypatch):
    target = _target()
    cache = _cached(target, tmp_path, n=8)
    cfg = Eagle3TrainConfig(epochs=1, accumulate=2, save_every=1, draft_vocab=60, val_fraction=0.0)
    full = train_eagle3(target, cache, str(tmp_path / "full"), cfg, progress=False)
    real_replace, calls = os.replace, {"n": 0}

    def crash_after_two_checkpoints(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("checkpoint.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash_after_two_checkpoints)
    with pytest.raises(KeyboardInterrupt):
        train_eagle3(target, cache, str(tmp_path / "resumed"), cfg, progress=False)
    monkeypatch.undo()
    assert os.path.isfile(tmp_path / "resumed" / "checkpoint.pt")
    resumed = train_eagle3(target, cache, str(tmp_path / "resumed"), cfg, progress=False)
    assert resumed["steps"] == full["steps"]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], rel=1e-5)


def test_probe_init_makes_the_fresh_head_a_linear_probe_of_the_next_hidden_state(tmp_path):
    from c2t_fast.training.draft_head import load_cached
    from c2t_fast.training.eagle3_head import probe_init, ttt_losses

    target = _target()
    data = load_cached(_cached(target, tmp_path, n=16))
    vocab = torch.arange(97)
    plain = new_eagle3_head(target, vocab, eagle3_feature_layers(LAYERS))
    head = new_eagle3_head(target, vocab, eagle3_feature_layers(LAYERS))
    residual = probe_init(head, data)
    assert 0 <= residual < 1
    seq = data[0]
    x = seq["aux"][:-1].float()
    with torch.no_grad():  # the decoder layer adds nothing yet: the output is fc(features)
        out = head.features_forward(seq["ids"][None, 1:].long(), x[None], torch.arange(x.shape[0])[None], None)[0]
        torch.testing.assert_close(out, head.fc(x))
        rows = target.lm_head.weight[vocab]
        ce = lambda h: sum(ttt_losses(h, s, rows, 1, 0.8)[1][0] for s in data) / len(data)
        assert ce(head) < ce(plain)  # a better start than the logit lens of one layer


def test_draft_vocabulary_counts_the_trained_targets():
    # pair t >= loss_from is scored against top[t + 1]: tops 5, 7 and 7, 7 (the 9s are before the reply)
    data = [{"ids": torch.tensor([1, 2, 3, 4]), "top": torch.tensor([9, 9, 5, 7]), "loss_from": 1},
            {"ids": torch.tensor([1, 2, 3]), "top": torch.tensor([9, 7, 7]), "loss_from": 0}]
    ids, coverage = draft_vocabulary(data, 1)
    assert ids.tolist() == [7] and coverage == pytest.approx(3 / 4)


def test_config_and_cache_mismatch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        Eagle3TrainConfig(steps=0).validate()
    target = _target()
    cache = str(tmp_path / "cache")
    cache_hidden_states(target, _sequences(target, 2, torch.Generator().manual_seed(0)), cache, 10_000, progress=False)
    with pytest.raises(ValueError, match="feature_layers"):
        cache_hidden_states(target, _sequences(target, 2, torch.Generator().manual_seed(0)), cache, 10_000, progress=False,
                            feature_layers=(2, 4, 5))
    with pytest.raises(ValueError, match="EAGLE-1 cache"):
        train_eagle3(target, cache, str(tmp_path / "out"), Eagle3TrainConfig(draft_vocab=10), progress=False)
