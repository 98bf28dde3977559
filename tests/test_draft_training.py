"""Draft-head training: feature caching (resumable), EAGLE-1 losses going down, resume, save/load; the
ShareGPT reader."""

import json
import os

import pytest
import torch

from c2t_fast.training.sharegpt import iter_json_array
from c2t_fast.training.draft_head import DraftTrainConfig, cache_hidden_states, train_draft
from c2t_fast.decoding.drafts import EagleDraftHead
from support import tiny_causal_lm


def _sequences(n, gen):
    # a learnable language: each token follows its predecessor by a fixed offset most of the time
    for _ in range(n):
        x = [int(torch.randint(0, 97, (1,), generator=gen))]
        for _ in range(31):
            x.append((x[-1] + 7) % 97 if torch.rand(1, generator=gen) < 0.9 else int(torch.randint(0, 97, (1,))))
        yield torch.tensor(x)


def test_cache_train_resume_and_load(tmp_path):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    cache = str(tmp_path / "cache")
    meta = cache_hidden_states(target, _sequences(20, torch.Generator().manual_seed(0)), cache, token_budget=320,
                               shard_size=4, progress=False)
    assert meta["tokens"] == 320 and meta["sequences"] == 10
    meta = cache_hidden_states(target, _sequences(20, torch.Generator().manual_seed(0)), cache, token_budget=640,
                               shard_size=4, progress=False)  # resumes after the 10 cached sequences
    assert meta["sequences"] == 20 and meta["shards"] == 6  # 4+4+2 per run
    out = str(tmp_path / "head")
    cfg = DraftTrainConfig(epochs=3, lr=3e-3, accumulate=2, save_every=5)
    report = train_draft(target, cache, out, cfg, progress=False)
    hist = report["history"]
    assert report["steps"] == 30 and hist[-1]["loss"] < hist[0]["loss"]
    assert os.path.isfile(os.path.join(out, "training.png")) and not os.path.isfile(os.path.join(out, "checkpoint.pt"))
    head = EagleDraftHead.from_pretrained(out, target)
    assert head.fc.weight.shape == (96, 192)


def test_fine_tuning_starts_from_the_saved_head(tmp_path):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    cache = str(tmp_path / "cache")
    cache_hidden_states(target, _sequences(12, torch.Generator().manual_seed(2)), cache, token_budget=384,
                        progress=False)
    first = str(tmp_path / "first")
    base = train_draft(target, cache, first, DraftTrainConfig(epochs=3, lr=3e-3, accumulate=2), progress=False)
    saved = EagleDraftHead.from_pretrained(first, target, full_vocab=True)
    # one step at a vanishing learning rate: the fine-tuned head is the saved one, not a fresh start
    cfg = DraftTrainConfig(epochs=1, lr=1e-9, accumulate=100, warmup=1, init_from=first, loss_vocab=0)
    tuned = train_draft(target, cache, str(tmp_path / "tuned"), cfg, progress=False)
    assert abs(tuned["history"][0]["loss"] - base["history"][-1]["loss"]) < 0.5 * base["history"][0]["loss"]
    head = EagleDraftHead.from_pretrained(str(tmp_path / "tuned"), target, full_vocab=True)
    for name in ("fc.weight", "layer.self_attn.q_proj.weight", "layer.post_attention_layernorm.weight"):
        torch.testing.assert_close(head.state_dict()[name], saved.state_dict()[name], atol=1e-5, rtol=0)
    fresh = train_draft(target, cache, str(tmp_path / "fresh"), DraftTrainConfig(epochs=1, lr=1e-9, accumulate=100,
                                                                                  warmup=1, loss_vocab=0),
                        progress=False)
    assert fresh["history"][0]["loss"] > tuned["history"][0]["loss"]
    with pytest.raises(ValueError, match="init_from"):
        train_draft(target, cache, str(tmp_path / "bad"), DraftTrainConfig(init_from=str(tmp_path / "cache")),
                    progress=False)


def test_training_resumes_from_a_checkpoint(tmp_path):
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    cache = str(tmp_path / "cache")
    cache_hidden_states(target, _sequences(8, torch.Generator().manual_seed(1)), cache, token_budget=256,
                        progress=False)
    out = str(tmp_path / "head")
    cfg = DraftTrainConfig(epochs=1, accumulate=2, save_every=2)
    full = train_draft(target, cache, str(tmp_path / "full"), cfg, progress=False)
    # simulate an interrupted run: keep the checkpoint written after step 2, then resume
    import c2t_fast.training.draft_head as dt

    real_replace = dt.os.replace

    def crash_after_first_checkpoint(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("checkpoint.pt"):
            raise KeyboardInterrupt

    dt.os.replace = crash_after_first_checkpoint
    try:
        train_draft(target, cache, out, cfg, progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        dt.os.replace = real_replace
    assert os.path.isfile(os.path.join(out, "checkpoint.pt"))
    resumed = train_draft(target, cache, out, cfg, progress=False)
    assert resumed["steps"] == full["steps"]
    assert [round(h["loss"], 5) for h in resumed["history"]] == [round(h["loss"], 5) for h in full["history"]]


def test_json_array_reader_drops_a_truncated_tail(tmp_path):
    path = tmp_path / "a.json"
    items = [{"id": i, "conversations": [{"from": "human", "value": "x" * 50}]} for i in range(40)]
    text = json.dumps(items, indent=1)
    path.write_text(text[: len(text) - 30])  # cut inside the last object
    got = list(iter_json_array(str(path), chunk_chars=97))
    assert [o["id"] for o in got] == list(range(39))
