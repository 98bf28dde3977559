"""The WISCA experiment scripts at toy sizes: real corpus, identical start for baseline and WISCA, resume."""

import json
import os

import pytest

from experiments.wisca import pretrain

TINY = ["--steps", "6", "--batch", "2", "--seq-len", "16", "--hidden", "32", "--layers", "1", "--heads", "4",
        "--group", "2", "--vocab", "256", "--sharegpt", "8", "--eval-every", "3", "--val-blocks", "4",
        "--ckpt-every", "2", "--tail", "2", "--seeds", "0"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("wisca"))


def test_pretrain_baseline_and_wisca_start_identically(corpus_dir):
    out = corpus_dir
    assert pretrain.main(["--out", out, "--configs", "baseline,wisca", "--every", "3", *TINY]) == 0
    base = json.load(open(os.path.join(out, "baseline", "seed0.json")))
    wisca = json.load(open(os.path.join(out, "wisca", "seed0.json")))
    # same init, same batches, and WISCA leaves outputs unchanged: the first loss is the same
    assert wisca["history"][0] == pytest.approx(base["history"][0], abs=1e-5)
    assert wisca["history"][1:] != base["history"][1:]  # but training differs afterwards
    assert [t[0] for t in wisca["transitions"]] == [0, 3, 6] and base["transitions"] == []
    assert [e[0] for e in base["evals"]] == [3, 6] and base["val_ppl"] > 1
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["wisca"]["vs"] == "baseline" and "exceeds_spread" in summary["wisca"]["val_loss_vs_ref"]
    assert os.path.getsize(os.path.join(out, "loss_curves.png")) > 0
    assert "| wisca | 1 |" in open(os.path.join(out, "summary.md")).read()


def test_pretrain_resumes_where_it_stopped(corpus_dir, monkeypatch, tmp_path):
    full = json.load(open(os.path.join(corpus_dir, "wisca", "seed0.json")))
    out = str(tmp_path / "resume")
    os.makedirs(out)
    os.symlink(os.path.join(corpus_dir, "cache"), os.path.join(out, "cache"))
    real_eval, calls = pretrain.evaluate, []

    def dying_eval(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the checkpoint at step 4
        return real_eval(*a, **k)

    monkeypatch.setattr(pretrain, "evaluate", dying_eval)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(["--out", out, "--configs", "wisca", "--every", "3", *TINY])
    assert os.path.isfile(os.path.join(out, "wisca", "seed0.ckpt.pt"))
    monkeypatch.setattr(pretrain, "evaluate", real_eval)
    assert pretrain.main(["--out", out, "--configs", "wisca", "--every", "3", *TINY]) == 0
    resumed = json.load(open(os.path.join(out, "wisca", "seed0.json")))
    assert resumed["history"] == pytest.approx(full["history"], abs=1e-6)
    assert [t[0] for t in resumed["transitions"]] == [0, 3, 6]
    assert not os.path.exists(os.path.join(out, "wisca", "seed0.ckpt.pt"))


def test_unknown_config_and_bad_group_are_rejected(corpus_dir):
    with pytest.raises(SystemExit):
        pretrain.main(["--out", corpus_dir, "--configs", "nonsense"])
    with pytest.raises(SystemExit):
        pretrain.main(["--out", corpus_dir, "--heads", "6", "--group", "4"])


def test_lora_experiment_starts_identically_and_reports(tmp_path):
    from experiments.wisca import lora

    out = str(tmp_path / "lora")
    assert lora.main(["--out", out, "--steps", "2", "--batch", "1", "--seq-len", "16", "--train-conversations", "6",
                      "--val-conversations", "3", "--seeds", "0", "--every", "1", "--eval-every", "1",
                      "--tail", "1", "--first-conversation", "9000"]) == 0
    runs = {c: json.load(open(os.path.join(out, c, "seed0.json"))) for c in lora.CONFIGS}
    # WISCA at init preserves the model's outputs (effective) or skips the B = 0 adapters: same start
    for c in ("wisca_effective", "wisca_adapter"):
        assert runs[c]["evals"][0][1] == pytest.approx(runs["baseline"]["evals"][0][1], rel=1e-5)
        assert [t[0] for t in runs[c]["transitions"]] == [0, 1, 2]
    assert runs["wisca_effective"]["history"][1] != runs["baseline"]["history"][1]
    assert "wisca_adapter" in open(os.path.join(out, "summary.md")).read()


def test_draft_experiment_trains_both_heads_and_measures_tau(tmp_path):
    from c2t_fast.training.draft_head import cache_hidden_states
    from experiments.wisca import draft
    from support import load_smollm2

    model, tok = load_smollm2()
    texts = [f"{i}: the quick brown fox jumps over the lazy dog. " * 4 for i in range(4)]
    cache = str(tmp_path / "cache")
    cache_hidden_states(model, (tok(t, return_tensors="pt")["input_ids"][0] for t in texts), cache, 10_000,
                        shard_size=1, progress=False)
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"turns": ["Say hi."]}) + "\n")
    out = str(tmp_path / "draft")
    assert draft.main(["--out", out, "--cache", cache, "--shards", "4", "--prompts", "1", "--max-new-tokens", "4",
                       "--every", "1", "--mt-bench", str(prompts)]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary) == {"baseline", "wisca"} and all(s["steps"] > 0 for s in summary.values())
    with pytest.raises(FileNotFoundError, match="has 4 shards"):
        draft.main(["--out", out, "--cache", cache, "--shards", "5", "--mt-bench", str(prompts)])
