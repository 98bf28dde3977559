"""The EAGLE-3 head trained on a self-distilled data set: soft (top-k) and hard labels and a second decoder
layer all train (the losses fall, held-out acceptance beats the untrained head), the draft vocabulary
covers the held-out replies as reported, the saved head loads and drafts losslessly, and a machine that
lacks the features recomputes them from the committed token ids."""

import json
import os

import pytest
import torch

from c2t_fast.decoding.drafts import Eagle3DraftHead
from c2t_fast.decoding.drafts.loading import load_draft
from c2t_fast.training.generator import GeneratorConfig
from c2t_fast.training.prompts import Job
from c2t_fast.training.selfdistill import generate_data
from c2t_fast.training.selfdistill_train import (SelfDistillData, SelfDistillTrainConfig, evaluate_head,
                                                 heldout_acceptance, train_selfdistilled, with_hidden)
from support import load_smollm2, tiny_smollm2_twin

WORDS = ["red", "blue", "one", "two", "cat", "dog", "sun", "rain", "yes", "no", "tree", "sea"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny random Llama (8 layers: features 2, 4, 5) with SmolLM2's tokenizer and its data set."""
    model, tok = tiny_smollm2_twin(layers=8)
    g = torch.Generator().manual_seed(0)
    jobs = [Job("sharegpt", 1000 + i, (" ".join(WORDS[j] for j in torch.randint(0, 12, (4,), generator=g)),),
                "heldout") for i in range(4)]
    jobs += [Job("sharegpt", i, tuple(" ".join(WORDS[j] for j in torch.randint(0, 12, (3,), generator=g))
                                      for _ in range(2))) for i in range(24)]
    d = tmp_path_factory.mktemp("selfdistill")
    gcfg = GeneratorConfig(slots=4, capacity=256, max_new_tokens=16, shard_jobs=8, sample_share=0.25, magpie_prompts=0,
                           linear="torch", kv_dtype="float32")
    generate_data(model, tok, str(d / "data"), gcfg, jobs=jobs, features_dir=str(d / "features"), progress=False)
    return model, d


CFG = SelfDistillTrainConfig(epochs=6, lr=3e-3, warmup=2, accumulate=2, save_every=5, draft_vocab=300, probe_jobs=8,
                             heldout_jobs=4)


@pytest.mark.parametrize("variant", [{}, {"loss": "hard"}, {"layers": 2}])
def test_trains_saves_and_drafts_losslessly(dataset, tmp_path, variant):
    model, d = dataset
    cfg = SelfDistillTrainConfig(**{**CFG.__dict__, **variant})
    out = str(tmp_path / "head")
    emb = model.get_input_embeddings().weight
    was = emb.requires_grad
    report = train_selfdistilled(model, str(d / "data"), out, cfg, features_dir=str(d / "features"), progress=False)
    # the shared (frozen) embedding took no gradient and keeps its flag
    assert emb.grad is None and emb.requires_grad == was
    hist = report["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert report["data"]["train_jobs"] == 24 and report["data"]["heldout_jobs"] == 4
    assert 0 < report["draft_vocab_coverage_heldout"] <= 1 and report["draft_vocab"] == 300
    acc = report["heldout"]
    assert acc["positions"] > 0 and acc["chain"][0] is not None
    head = load_draft(out, model)
    assert isinstance(head, Eagle3DraftHead) and len(head.extra_layers) == cfg.layers - 1
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == cfg.layers
    # the saved head (raw features) measures what the trained one did (standardised features)
    data = SelfDistillData(str(d / "data"), str(d / "features"))
    data.store(model)
    held = [data.load(r) for r in data.refs("heldout")]
    again = heldout_acceptance(head, held, torch.ones(held[0]["aux"].shape[1]))
    assert again["chain"] == pytest.approx(acc["chain"], abs=0.02)
    assert evaluate_head(model, head, str(d / "data"), str(d / "features"), progress=False) == \
        heldout_acceptance(head, held)
    from c2t_fast.decoding.engine import SpeculativeGenerator
    from c2t_fast.decoding.strategies import Chain

    prompt = held[0]["ids"][:30]
    with torch.no_grad():
        want = model.generate(prompt[None], do_sample=False, max_new_tokens=10, min_new_tokens=10,
                              pad_token_id=0)[0, 30:].tolist()
    assert SpeculativeGenerator(model, head, Chain(3), eos_token_id=[], budget=None, ngram=None).generate(prompt, 10).tokens == want


def test_soft_and_hard_losses_agree_on_a_one_hot_teacher(dataset):
    from c2t_fast.training.eagle3_head import new_eagle3_head
    from c2t_fast.training.selfdistill_train import ttt_losses

    model, d = dataset
    data = SelfDistillData(str(d / "data"), str(d / "features"))
    data.store(model)
    seq = data.load(data.refs("train")[0])
    head = new_eagle3_head(model, torch.arange(0, 49152, 7), data.feature_layers)
    one_hot = {**seq, "top_logp": torch.where(torch.arange(16) == 0, 0.0, -float("inf")).expand_as(seq["top_logp"])}
    scale = torch.ones(seq["aux"].shape[1])
    soft = ttt_losses(head, one_hot, scale, SelfDistillTrainConfig(loss="soft"))
    hard = ttt_losses(head, seq, scale, SelfDistillTrainConfig(loss="hard"))
    assert soft[1] == pytest.approx(hard[1], rel=1e-5) and soft[3] == hard[3]
    real = ttt_losses(head, seq, scale, SelfDistillTrainConfig(loss="soft"))
    assert real[3][0] >= hard[3][0]  # soft labels reach rows whose argmax is outside the draft vocabulary


def test_an_eagle1_head_is_measured_on_the_same_positions(dataset):
    """The shipped kind of head (EAGLE-1: the target's last hidden state) is scored on the positions every
    EAGLE-3 scaling run is; its draft columns are mapped to target ids before they are compared."""
    from c2t_fast.decoding.drafts import EagleDraftHead
    from c2t_fast.training.eagle3_head import new_eagle3_head

    model, d = dataset
    data = SelfDistillData(str(d / "data"), str(d / "features"))
    data.store(model)
    refs = data.refs("heldout")
    eagle3 = new_eagle3_head(model, torch.arange(0, 49152, 7), data.feature_layers)
    base = heldout_acceptance(eagle3, [data.load(r) for r in refs])
    head = EagleDraftHead(model.config).attach(model).eval()
    with pytest.raises(ValueError, match="with_hidden"):
        heldout_acceptance(head, [data.load(r) for r in refs])
    full = evaluate_head(model, head, str(d / "data"), str(d / "features"), progress=False)
    assert full["positions"] == base["positions"] > 0 and all(0 <= c <= 1 for c in full["chain"])
    seqs = with_hidden(model, data, refs)
    tops = torch.cat([s["top"] for s in seqs]).unique()
    head.restrict_vocab(torch.tensor([i for i in range(0, 49152, 5) if i not in set(tops.tolist())]))
    assert heldout_acceptance(head, seqs)["chain"][0] == 0.0  # no column can draft a target argmax
    head.restrict_vocab(tops)  # every column a target argmax: a pick of column j is token tops[j]
    picks = heldout_acceptance(head, seqs)["chain"][0]
    assert picks >= full["chain"][0] - 1e-9  # a vocabulary of only the right answers cannot accept less


def test_missing_features_are_recomputed_from_the_ids(dataset, tmp_path):
    model, d = dataset
    data = SelfDistillData(str(d / "data"), str(tmp_path / "elsewhere"))  # another machine: no features
    refs = data.refs("train", reply_tokens=40)
    data.ensure_features(model, refs, progress=False)
    store = data.store(model)
    assert all(store.has(r["shard"], r["job"]) for r in refs)  # only the jobs asked for
    assert len(store.covered(0)["index"]) == len(refs) < 24 and not store.covered(2)["index"]
    orig = SelfDistillData(str(d / "data"), str(d / "features"))
    orig.store(model)
    for ref in refs:
        a, b = data.load(ref), orig.load(ref)
        torch.testing.assert_close(a["aux"].float(), b["aux"].float(), rtol=1e-2, atol=1e-2)
        assert (a["top_ids"][:, 0] == b["top_ids"][:, 0]).float().mean() > 0.95


def test_config_validation_and_a_data_set_without_training_jobs(tmp_path, dataset):
    model, d = dataset
    for bad in ({"loss": "kl"}, {"layers": 3}, {"draft_vocab": 0}, {"reply_tokens": 0}):
        with pytest.raises(ValueError):
            SelfDistillTrainConfig(**bad).validate()
    tok = load_smollm2()[1]
    gcfg = GeneratorConfig(slots=2, capacity=128, max_new_tokens=4, magpie_prompts=0, linear="torch")
    generate_data(model, tok, str(tmp_path / "data"), gcfg, jobs=[Job("sharegpt", 1, ("red blue",), "heldout")],
                  features_dir=str(tmp_path / "f"), progress=False)
    with pytest.raises(ValueError, match="no training jobs"):
        train_selfdistilled(model, str(tmp_path / "data"), str(tmp_path / "head"), CFG, features_dir=str(tmp_path / "f"),
                            progress=False)


def test_precision_choice_is_checked_and_resolved():
    from c2t_fast.training import precision
    from c2t_fast.training.selfdistill_train import SelfDistillTrainConfig

    with pytest.raises(ValueError, match="precision"):
        SelfDistillTrainConfig(precision="fp16").validate()
    with pytest.raises(ValueError, match="precision"):
        precision.resolve("half", torch.device("cpu"))
    assert precision.resolve("fp32", torch.device("cpu")) == torch.float32
    assert precision.resolve("bf16", torch.device("cpu")) == torch.bfloat16
    assert precision.resolve("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)


def test_warmup_is_at_most_a_tenth_of_the_run():
    from c2t_fast.training.draft_head import lr_factor

    # 44 steps with warmup 50 once never reached the peak rate
    assert lr_factor(4, 44, 50) == pytest.approx(1.0)
    assert lr_factor(0, 1000, 20) == pytest.approx(1 / 20)
    assert lr_factor(1000, 1000, 20) == pytest.approx(0.1)
