"""The draft head and classifier shipped for SmolLM2: they load by default, they are trained (not just
present), and generation with them is the target's own greedy output."""

import json
import os

import torch

from c2t_fast.classifier import DEFAULT_DIR as CLASSIFIER_DIR
from c2t_fast.classifier import C2TClassifier
from c2t_fast.draft_training import evaluate_draft
from c2t_fast.drafts import EagleDraftHead
from c2t_fast.engine import SpeculativeGenerator
from c2t_fast.loading import DEFAULT_DRAFT_DIR, load_draft
from c2t_fast.strategies import C2T


def _smollm2():
    from support import load_smollm2

    return load_smollm2()


def test_shipped_head_is_the_default_and_agrees_with_the_target_on_unseen_text():
    from c2t_fast.data import sharegpt_conversations
    from c2t_fast.draft_training import encode_conversations
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


def test_generation_with_the_shipped_artifacts_is_the_targets_greedy_output():
    model, tok = _smollm2()
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"][0]
    try:
        gen = SpeculativeGenerator(model, load_draft(None, model), C2T(C2TClassifier.from_pretrained()),
                                   eos_token_id=[])
        out = gen.generate(ids, max_new_tokens=24)
        ref = model.generate(ids[None], do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
        assert out.tokens == ref[0, ids.numel():].tolist()
        assert out.metrics.tau > 0.3  # the drafts are accepted (a random head: ~0)
    finally:
        from c2t_fast import unpatch

        unpatch(model)
