"""Self-distilled draft data: the target's own replies stored as token ids, resumable after an
interruption with the same result, readable as training sequences, and the CLI stage."""

import json

import pytest
import torch

from c2t_fast.hf.adapter import encode_chat
from c2t_fast.training import distill as distill_mod
from c2t_fast.training.distill import DistillConfig, distill, distilled_sequences
from support import tiny_smollm2_twin

PROMPTS = ["Say hello.", "Count to three.", "Name a colour.", "What is 2+2?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model directory."""
    model, tok = tiny_smollm2_twin(layers=2)
    path = tmp_path_factory.mktemp("target")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


CFG = DistillConfig(conversations=5, batch_size=2, max_new_tokens=6, sample_every=2, temperature=0.9, seed=1)


def test_replies_are_the_targets_own_and_stored_compactly(pair, tmp_path):
    model, tok, _ = pair
    meta = distill(model, tok, str(tmp_path), CFG, prompts=PROMPTS, progress=False)
    assert meta["sequences"] == 5 and meta["dtype"] == "<u2" and meta["tokens_per_s"] > 0
    rows = [json.loads(x) for x in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in rows] == [False, False, True, True, False]  # every 2nd batch sampled
    assert (tmp_path / "tokens.bin").stat().st_size == 2 * sum(r["length"] for r in rows)
    seqs = list(distilled_sequences(str(tmp_path)))
    for prompt, row, seq in zip(PROMPTS, rows, seqs):
        ids = encode_chat(tok, prompt)
        assert seq[:row["prompt_len"]].tolist() == ids.tolist()
        reply = seq[row["prompt_len"]:]
        assert 1 <= reply.numel() <= 6 and meta["tokens"] >= reply.numel()
        if not row["sampled"]:  # greedy batches: the model's own unbatched greedy reply
            want = model.generate(ids[None], do_sample=False, max_new_tokens=6, pad_token_id=0)[0, ids.numel():]
            assert reply.tolist() == want[:reply.numel()].tolist()
    assert [s.numel() for s in distilled_sequences(str(tmp_path), max_len=10)] == [min(10, s.numel()) for s in seqs]


def test_prompts_sorted_by_length_within_groups(pair, tmp_path):
    from c2t_fast.training.distill import answer_order

    assert answer_order([5, 3, 9, 1, 4], 0) == [0, 1, 2, 3, 4]
    assert answer_order([5, 3, 9, 1, 4], 2) == [1, 0, 3, 2, 4]
    assert answer_order([5, 3, 9, 1, 4], 10) == [3, 1, 4, 0, 2]
    assert answer_order([2, 2, 1], 3) == [2, 0, 1]  # stable
    model, tok, _ = pair
    cfg = DistillConfig(conversations=5, batch_size=2, max_new_tokens=4, sample_every=0, length_sort_batches=2)
    meta = distill(model, tok, str(tmp_path), cfg, prompts=PROMPTS, progress=False)
    assert meta["sequences"] == 5 and meta["config"]["length_sort_batches"] == 2
    rows = [json.loads(x) for x in (tmp_path / "index.jsonl").read_text().splitlines()]
    lengths = [encode_chat(tok, p).numel() for p in PROMPTS]
    assert [r["prompt"] for r in rows] == answer_order(lengths, 4)
    for row, seq in zip(rows, distilled_sequences(str(tmp_path))):  # each reply is still its own prompt's
        ids = encode_chat(tok, PROMPTS[row["prompt"]])
        assert seq[:row["prompt_len"]].tolist() == ids.tolist()
        want = model.generate(ids[None], do_sample=False, max_new_tokens=4, pad_token_id=0)[0, ids.numel():]
        assert seq[row["prompt_len"]:].tolist() == want[:seq.numel() - row["prompt_len"]].tolist()
    with pytest.raises(ValueError, match="length_sort_batches must be >= 0"):
        DistillConfig(length_sort_batches=-1).validate()


def test_a_run_from_before_length_sorting_resumes(pair, tmp_path):
    model, tok, _ = pair
    cfg = DistillConfig(conversations=2, batch_size=2, max_new_tokens=3, sample_every=0)
    distill(model, tok, str(tmp_path), cfg, prompts=PROMPTS, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["config"]["length_sort_batches"]  # written by the first version of the stage
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    more = DistillConfig(conversations=4, batch_size=2, max_new_tokens=3, sample_every=0)
    with pytest.raises(ValueError, match="other settings"):  # conversations differ
        distill(model, tok, str(tmp_path), more, prompts=PROMPTS, progress=False)
    assert distill(model, tok, str(tmp_path), cfg, prompts=PROMPTS, progress=False)["sequences"] == 2


def test_an_interrupted_run_resumes_to_the_same_data(pair, tmp_path, monkeypatch):
    model, tok, _ = pair
    distill(model, tok, str(tmp_path / "whole"), CFG, prompts=PROMPTS, progress=False)
    real, calls = distill_mod.generate_batch, {"n": 0}

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "generate_batch", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        distill(model, tok, str(tmp_path / "resumed"), CFG, prompts=PROMPTS, progress=False)
    assert json.loads((tmp_path / "resumed" / "meta.json").read_text())["sequences"] == 4
    (tmp_path / "resumed" / "index.jsonl").open("a").write('{"half": "written"}\n')  # a torn write
    monkeypatch.setattr(distill_mod, "generate_batch", real)
    distill(model, tok, str(tmp_path / "resumed"), CFG, prompts=PROMPTS, progress=False)
    for name in ("tokens.bin", "index.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        distill(model, tok, str(tmp_path / "resumed"), DistillConfig(conversations=5, batch_size=3), prompts=PROMPTS)


def test_the_cli_stage_and_training_on_it(pair, tmp_path, capsys):
    from c2t_fast import cli
    from c2t_fast.training.draft_head import cache_hidden_states

    model, _, path = pair
    assert cli.main(["distill-data", "--target", str(path), "--out", str(tmp_path / "d"), "--conversations", "2",
                     "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "2 sequences" in capsys.readouterr().out
    meta = cache_hidden_states(model, distilled_sequences(str(tmp_path / "d")), str(tmp_path / "cache"), 10_000,
                               progress=False)
    assert meta["sequences"] == 2
    # a second run from later conversations, both trained on, the second head fine-tuned from the first
    assert cli.main(["distill-data", "--target", str(path), "--out", str(tmp_path / "d2"), "--conversations", "1",
                     "--start", "3100", "--batch-size", "1", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    common = ["train-draft", "--target", str(path), "--distilled", str(tmp_path / "d"), "--distilled",
              str(tmp_path / "d2"), "--cache", str(tmp_path / "cache2"), "--epochs", "1", "--loss-vocab", "0",
              "--held-out", "0"]
    assert cli.main([*common, "--out", str(tmp_path / "h1")]) == 0
    assert json.loads((tmp_path / "cache2" / "meta.json").read_text())["consumed"] == 3  # both runs read
    assert cli.main([*common, "--out", str(tmp_path / "h2"), "--init", str(tmp_path / "h1")]) == 0
    assert json.loads((tmp_path / "h2" / "report.json").read_text())["config"]["init_from"] == str(tmp_path / "h1")
    assert cli.main([*common, "--out", str(tmp_path / "h3"), "--init", str(tmp_path / "h1"), "--head", "eagle3"]) != 0
    with pytest.raises(ValueError, match="conversations must be >= 1"):
        DistillConfig(conversations=0).validate()
