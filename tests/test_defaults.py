"""One set of defaults (``decoding.defaults``): ``c2t-fast generate``, ``c2t-fast bench`` (a strategy's row
with no flags, labelled), ``c2t_fast.generate`` and ``SpeculativeGenerator`` run the same main job unless
told otherwise, and the door's draft defaults to the shipped head only for the shipped target."""

import json

import pytest
import torch

import c2t_fast
from c2t_fast.cli import build_parser, main
from c2t_fast.decoding import defaults
from c2t_fast.decoding.drafts import EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.strategies import C2T
from support import load_smollm2, tiny_causal_lm


def test_the_cli_flags_default_to_the_main_job():
    g = build_parser().parse_args(["generate", "--prompt", "x"])
    assert (g.strategy, g.budget, g.ngram, g.draft, g.classifier) == (defaults.STRATEGY, defaults.BUDGET,
                                                                     defaults.NGRAM_TOKENS, None, None)
    b = build_parser().parse_args(["bench", "--prompts", "p", "--out", "o"])
    assert (b.budget, b.ngram, b.draft, b.classifier) == (defaults.BUDGET, str(defaults.NGRAM_TOKENS), None, None)
    assert defaults.STRATEGY in b.strategies.split(",")
    assert (g.datastore, g.recycling, b.datastore, b.recycling) == (defaults.DEFAULT,) * 4
    told = build_parser().parse_args(["generate", "--prompt", "x", "--datastore", "none", "--no-recycling"])
    assert (told.datastore, told.recycling) == ("none", False)
    assert build_parser().parse_args(["generate", "--prompt", "x", "--recycling"]).recycling is True


def test_the_bench_rows_name_only_the_sources_told_otherwise():
    from c2t_fast.bench import _runs
    from c2t_fast.cli import _recycling_list

    assert _recycling_list("default,0,1") == ("default", 0, 1)
    with pytest.raises(ValueError, match="--recycling"):
        _recycling_list("yes")
    runs = _runs(["c2t"], [{}], (10,), ("auto",), ("default", "none"), ("default", 0))
    assert [s for _, s in runs] == [{"ngram": 10, "budget": "auto"}, {"ngram": 10, "budget": "auto", "recycling": 0},
                                    {"ngram": 10, "budget": "auto", "datastore": "none"},
                                    {"ngram": 10, "budget": "auto", "datastore": "none", "recycling": 0}]
    assert defaults.is_default_setting(*runs[0]) and not defaults.is_default_setting(*runs[1])


def test_the_main_job_defaults_are_the_modules():
    from c2t_fast.decoding.main_job import MainJob

    job = MainJob(prompt="x")
    assert (job.strategy, job.budget, job.ngram, job.datastore, job.recycling) == (
        defaults.STRATEGY, defaults.BUDGET, defaults.NGRAM_TOKENS, defaults.DEFAULT, defaults.DEFAULT)


def test_the_shipped_target_defaults_to_its_datastore_and_recycling_and_another_to_neither():
    from c2t_fast.decoding.drafts.datastore import DEFAULT_DIR, Datastore
    from c2t_fast.decoding.drafts.sources import DatastoreSource, NgramSource, RecyclingSource

    model, _ = load_smollm2()
    gen = SpeculativeGenerator(model, None)  # the sources alone: no head needed to see them
    assert [type(s) for s in gen.sources] == [NgramSource, DatastoreSource, RecyclingSource]
    assert len(gen.sources[1].store) == json.load(open(f"{DEFAULT_DIR}/meta.json"))["tokens"]
    told = SpeculativeGenerator(model, None, datastore=None, recycling=False)
    assert [type(s) for s in told.sources] == [NgramSource]
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    foreign = SpeculativeGenerator(target, EagleDraftHead(target.config).attach(target))
    assert [type(s) for s in foreign.sources] == [NgramSource]
    assert isinstance(defaults.resolve_datastore("shipped", target), Datastore)  # asked for: given
    assert defaults.resolve_datastore("default", model, recording=True) is None
    assert defaults.resolve_recycling("default", model, recording=True) is None
    with pytest.raises(TypeError, match="recycling"):
        defaults.resolve_recycling(1, model)


def test_the_engine_defaults_to_the_main_job():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    gen = SpeculativeGenerator(target, EagleDraftHead(target.config).attach(target))
    assert isinstance(gen.strategy, C2T) and gen.ngram.num_tokens == defaults.NGRAM_TOKENS and gen.cost_rule is not None
    plain = SpeculativeGenerator(target, EagleDraftHead(target.config).attach(target), budget=None, ngram=None)
    assert plain.ngram is None and plain.cost_rule is None  # told otherwise


def test_the_door_needs_only_a_draft_for_a_foreign_target():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    head = EagleDraftHead(target.config).attach(target).eval()
    prompt = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(1))
    want = target.generate(prompt, do_sample=False, max_new_tokens=10, pad_token_id=0)
    got = target.generate(prompt, do_sample=False, max_new_tokens=10, pad_token_id=0,
                          custom_generate=c2t_fast.generate, draft=head)  # the default strategy, budget, n-grams
    assert got.tolist() == want.tolist()
    with pytest.raises(ValueError, match="c2t_fast.load_draft"):
        target.generate(prompt, max_new_tokens=4, pad_token_id=0, custom_generate=c2t_fast.generate)


def test_the_door_on_the_shipped_target_takes_the_shipped_head():
    model, tok = load_smollm2()
    from c2t_fast.hf.shipped import is_shipped_target

    assert is_shipped_target(model) and not is_shipped_target(tiny_causal_lm("llama"))
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    want = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
    got = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0, custom_generate=c2t_fast.generate)
    assert got.tolist() == want.tolist()


def test_the_bench_labels_the_default_row(tmp_path, capsys):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "turns": ["Say hi."]}) + "\n")
    out = tmp_path / "b"
    assert main(["bench", "--prompts", str(prompts), "--out", str(out), "--strategies", "c2t,ar", "--ngram", "0,10",
                 "--max-new-tokens", "6"]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    flagged = [(r["strategy"], r["setting"]) for r in rows if r.get("default")]
    assert flagged == [("c2t", {"ngram": 10, "budget": "auto"})]
    assert "c2t (default)" in capsys.readouterr().out


def test_the_tree_k_flag_maps_to_the_strategy_parameter_both_ways():
    from c2t_fast.bench import parse_sweeps
    from c2t_fast.decoding.defaults import flag_name, param_name

    assert flag_name("top_k") == "top_k_tree" and param_name("top_k_tree") == "top_k"
    assert all(param_name(flag_name(p)) == p for p in ("beta", "top_k", "depth", "total_tokens"))
    assert parse_sweeps(["top-k-tree=4,8"]) == [{"top_k": 4}, {"top_k": 8}]


def test_a_bench_row_accumulates_the_runs_metrics():
    from c2t_fast.bench import _row
    from c2t_fast.decoding.metrics import Metrics

    a = Metrics(steps=3, accepted=[1, 0, 2], draft_tokens=[4, 0, 5], new_tokens=6, plain_steps=1, draft_time=0.5,
                verify_time=1.0, total_time=2.0, source_nodes={"ngram": 2}, ngram_nodes=2)
    b = Metrics(steps=2, accepted=[3, 1], draft_tokens=[6, 2], new_tokens=6, total_time=1.0, source_nodes={"ngram": 1,
                "datastore": 4}, baseline_time=3.0)
    tot = Metrics().add(a).add(b)
    assert (tot.steps, tot.accepted, tot.gamma, tot.new_tokens, tot.plain_steps) == (5, [1, 0, 2, 3, 1], 17, 12, 1)
    assert tot.source_nodes == {"ngram": 3, "datastore": 4} and tot.ngram_nodes == 2 and tot.baseline_time == 3.0
    row = _row("c2t", {}, tot)
    assert row["tau"] == 7 / 5 and row["gamma_per_step"] == 17 / 5 and row["tokens_per_s"] == 12 / 3.0
    assert row["plain_share"] == 1 / 5 and _row("ar", {}, Metrics(new_tokens=4, total_time=2.0))["tau"] is None
    assert a.steps == 3 and a.source_nodes == {"ngram": 2}  # the added runs are not changed
