"""The c2t-fast command line on the shipped SmolLM2 target (the target drafts for itself)."""

import json
import os

import numpy as np
import pytest

from c2t_fast import cli

MT_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "spec_bench", "mt_bench.jsonl")


def test_generate_prints_text_and_metrics(capsys):
    assert cli.main(["generate", "--prompt", "What is the capital of France?", "--draft", "self", "--strategy",
                     "eagle2", "--top-k-tree", "3", "--depth", "2", "--total-tokens", "8", "--max-new-tokens",
                     "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "tau " in out and "gamma " in out and "tokens/s" in out and "speed-up" in out


def test_generate_runs_on_the_shipped_defaults(capsys):
    # the README's main job: SmolLM2, shipped head and classifier, C2T, nothing else passed
    assert cli.main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "speed-up" in out


def test_generate_with_a_draft_for_another_target_says_so(tmp_path, capsys):
    from c2t_fast.decoding.drafts import EagleDraftHead
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=1)
    EagleDraftHead(cfg).save_pretrained(str(tmp_path / "head"))
    assert cli.main(["generate", "--prompt", "hi", "--draft", str(tmp_path / "head")]) == 2
    assert "hidden_size 64, this target has 576" in capsys.readouterr().err


def test_bench_writes_results_table_and_plot(tmp_path, capsys):
    prompts = tmp_path / "q.jsonl"
    lines = open(MT_BENCH).read().splitlines()[:2] if os.path.isfile(MT_BENCH) else [
        json.dumps({"question_id": 1, "category": "x", "turns": ["Say hello."]}),
        json.dumps({"question_id": 2, "category": "x", "turns": ["Count to three."]})]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bench"
    assert cli.main(["bench", "--prompts", str(prompts), "--strategies", "chain,eagle2,ar", "--sweep", "length=1,2",
                     "--sweep", "total_tokens=4", "--draft", "self", "--top-k-tree", "2", "--depth", "1",
                     "--max-new-tokens", "8", "--ngram", "0,3", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    # chain at 2 lengths and eagle2 at 1 setting, each without and with 3-token n-gram branches, and ar
    assert len(rows) == (2 * 2 + 2 + 1) * 2 and {r["strategy"] for r in rows} == {"chain", "eagle2", "ar"}
    assert sum(r.get("ngram") == 3 for r in rows) == 3 * 2 and all("ngram_nodes" in r for r in rows if "tau" in r)
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert summary[-1]["strategy"] == "ar" and summary[-1]["speedup_vs_ar"] == 1.0 and summary[0]["speedup_vs_ar"] > 0
    assert (out / "tau_gamma.png").stat().st_size > 0 and "| chain |" in (out / "summary.md").read_text()


def test_bad_sweep_is_rejected(capsys):
    import pytest

    from c2t_fast.bench import parse_sweeps

    with pytest.raises(ValueError, match="expected NAME=v1,v2"):
        parse_sweeps(["nonsense"])
    with pytest.raises(ValueError, match="beta takes float values"):
        parse_sweeps(["beta=high"])
    assert parse_sweeps(["top_k_tree=2,3", "beta=0.5"]) == [{"top_k": 2, "beta": 0.5}, {"top_k": 3, "beta": 0.5}]
    assert cli.main(["bench", "--prompts", "x.jsonl", "--out", "y", "--sweep", "nonsense"]) == 2
    assert "expected NAME=v1,v2" in capsys.readouterr().err


def test_collect_trees_records_full_trees(tmp_path, capsys):
    from c2t_fast.training.tree_dataset import open_tree_dataset

    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a joke.\nName a color.\n")
    out = tmp_path / "trees"
    assert cli.main(["collect-trees", "--prompts", str(prompts), "--out", str(out), "--draft", "self",
                     "--top-k-tree", "2", "--depth", "2", "--max-new-tokens", "6"]) == 0
    rows = open_tree_dataset(str(out))
    assert len(rows) > 0 and len(rows) % (2 + 2 * 4) == 0 and rows["label"].sum() > 0


def test_collect_trees_resumes_after_the_prompts_it_has_done(tmp_path, monkeypatch):
    from c2t_fast.decoding.engine import SpeculativeGenerator
    from c2t_fast.training.tree_dataset import open_tree_dataset

    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a joke.\nName a color.\nCount to three.\n")
    argv = ["collect-trees", "--prompts", str(prompts), "--draft", "self", "--top-k-tree", "2", "--depth", "2",
            "--max-new-tokens", "4"]
    assert cli.main([*argv, "--out", str(tmp_path / "full")]) == 0
    full = open_tree_dataset(str(tmp_path / "full"))
    real, calls = SpeculativeGenerator.generate, []

    def interrupted_at_the_second_prompt(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(SpeculativeGenerator, "generate", interrupted_at_the_second_prompt)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv, "--out", str(tmp_path / "part")])
    monkeypatch.setattr(SpeculativeGenerator, "generate", real)
    meta = json.loads((tmp_path / "part" / "meta.json").read_text())
    assert meta["prompts_done"] == 1 and meta["trees"] > 0
    assert cli.main([*argv, "--out", str(tmp_path / "part")]) == 0
    part = open_tree_dataset(str(tmp_path / "part"))
    assert json.loads((tmp_path / "part" / "meta.json").read_text())["prompts_done"] == 3
    np.testing.assert_array_equal(part["label"], full["label"])
    np.testing.assert_array_equal(part["tree"], full["tree"])
    assert cli.main([*argv, "--max-new-tokens", "5", "--out", str(tmp_path / "part")]) == 2  # other settings
    prompts.write_text("Tell me a joke.\nName a shape.\nCount to three.\n")
    assert cli.main([*argv, "--out", str(tmp_path / "part")]) == 2  # other prompts


def test_collect_trees_from_sharegpt_needs_exactly_one_source(tmp_path, capsys):
    from c2t_fast.training.tree_dataset import open_tree_dataset

    out = tmp_path / "trees"
    assert cli.main(["collect-trees", "--sharegpt", "9000", "--limit", "1", "--out", str(out), "--draft", "self",
                     "--top-k-tree", "2", "--depth", "1", "--max-new-tokens", "3"]) == 0
    assert len(open_tree_dataset(str(out))) > 0
    assert cli.main(["collect-trees", "--out", str(out), "--draft", "self"]) == 2
    assert "exactly one of --prompts" in capsys.readouterr().err


def test_bench_reports_stock_generate_beside_the_routed_target(tmp_path):
    """ar: plain decoding of the target as loaded (skinny linear layers); ar_stock: torch's; --stock-linear
    loads the target without the routing."""
    import torch

    from c2t_fast.kernels.skinny_linear import fast_linear_installed
    from c2t_fast.hf.shipped import load_smollm2

    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["Say hello."]}) + "\n")
    assert cli.main(["bench", "--prompts", str(prompts), "--strategies", "ar,ar_stock,chain", "--draft", "self",
                     "--max-new-tokens", "6", "--device", "cpu", "--out", str(tmp_path / "a")]) == 0
    rows = json.loads((tmp_path / "a" / "summary.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["ar", "ar_stock", "chain"] and rows[1]["new_tokens"] == 6
    model, _ = load_smollm2(torch.float32)  # the instance load_target got (the cache keys on the argument)
    assert fast_linear_installed(model)  # ar_stock put the routing back
    assert cli.main(["bench", "--prompts", str(prompts), "--strategies", "ar", "--stock-linear", "--max-new-tokens",
                     "4", "--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    assert not fast_linear_installed(model)
