"""A tensor-parallel target (transformers' ``tp_plan="auto"``, 2 gloo processes of one thread each): every
rank generates the unsharded target's output with every strategy, the cost rule and n-gram branches, even
when the ranks' clocks and cost caches differ (``decoding.agreement``); seeded sampling is the same on both
ranks and equals the unsharded engine's; a rank that fails, leaves or runs something else ends every rank
with an error instead of a hang."""

import json
import os
import socket
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
PROMPT = [1, 5, 7, 9, 11, 3, 5, 7]
NEW = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_profile(key: str = ""):
    from c2t_fast.decoding.cost import LENGTHS, CostProfile

    # verification barely grows with T: trees pay, so the rule drafts and sizes on most steps
    return CostProfile(list(LENGTHS), [0.010 + 0.0002 * t for t in LENGTHS], key=key)


class _SkewedClock:
    """``time`` as the engine reads it, running ``factor`` times faster: a rank whose own timings differ."""

    def __init__(self, factor):
        import time

        self._t, self.factor = time, factor

    def perf_counter(self):
        return self._t.perf_counter() * self.factor


def _fail_at(draft, at: int, die: bool) -> None:
    """Make ``draft`` raise (or end its process) at its ``at``-th tree (the instance only: same type)."""
    calls, root = [0], draft.root

    def failing_root(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            if die:
                os._exit(3)
            raise RuntimeError("injected draft failure")
        return root(*a, **k)

    draft.root = failing_root


def _worker(rank, world, port, model_dir, out_dir, scenario):
    sys.path.insert(0, HERE)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from datetime import timedelta

    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from c2t_fast.decoding import engine
    from c2t_fast.decoding.agreement import RankAgreement, RankFailure
    from c2t_fast.decoding.cost import CostRule, profile_key
    from c2t_fast.decoding.drafts import DraftLM
    from support import tiny_causal_lm, tiny_strategies

    result = {}
    try:
        target = transformers.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
        assert type(target.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
        ids = torch.tensor(PROMPT)
        if scenario == "lossless":
            # rank 0 has a cached cost profile, rank 1 none (it would measure alone: forwards with collectives)
            # and a clock 3x faster: only agreed decisions keep the two in step
            cost_dir = os.path.join(out_dir, f"costs-{rank}")
            os.makedirs(cost_dir, exist_ok=True)
            os.environ["C2T_FAST_COST_DIR"] = cost_dir
            if rank == 0:
                from dataclasses import asdict

                key = profile_key(target, torch.device("cpu"))
                with open(os.path.join(cost_dir, f"{key}.json"), "w") as f:
                    json.dump(asdict(_fixed_profile(key)), f)
            else:
                engine.time = _SkewedClock(3.0)
            for name, strategy in tiny_strategies().items():
                gen = engine.SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 4, 2, seed=2)), strategy,
                                                  eos_token_id=[], budget="auto", ngram=4)
                assert isinstance(gen.agreement, RankAgreement)
                out = gen.generate(ids, NEW)
                result[name] = {"tokens": out.tokens, "verified": out.metrics.draft_tokens,
                                "profile": gen.cost_rule.profile.verify_s}
        elif scenario == "sampling":
            draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=2))
            for name, strategy in tiny_strategies().items():
                rule = CostRule(_fixed_profile(), draft_cost=0.002)
                gen = engine.SpeculativeGenerator(target, draft, strategy, eos_token_id=[], budget=rule, ngram=4)
                result[name] = engine.SpeculativeGenerator.generate(gen, ids, NEW, temperature=0.9, seed=11).tokens
            gen = engine.SpeculativeGenerator(target, draft, tiny_strategies()["chain"], eos_token_id=[], budget=None,
                                              ngram=None)
            result["unseeded"] = gen.generate(ids, NEW, temperature=1.0).tokens
        elif scenario == "mismatch":
            gen = engine.SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 4, 2, seed=2)),
                                              tiny_strategies()["chain"], eos_token_id=[], budget=None, ngram=None)
            try:
                gen.generate(ids if rank == 0 else ids.flip(0), NEW)
                result["mismatch"] = "no error"
            except RankFailure as err:
                result["mismatch"] = str(err)
            try:  # a bad argument on one rank only: it raises its ValueError, the other a RankFailure
                gen.generate(ids, NEW if rank == 0 else 0)
                result["bad_input"] = "no error"
            except (RankFailure, ValueError) as err:
                result["bad_input"] = type(err).__name__
            result["after"] = gen.generate(ids, NEW).tokens  # the ranks are still in step
        else:  # "fail" / "die": rank 1's draft raises (or its process ends) at its third tree
            draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=2))
            if rank == 1:
                _fail_at(draft, 3, scenario == "die")
            gen = engine.SpeculativeGenerator(target, draft, tiny_strategies()["chain"], eos_token_id=[],
                                              budget=None, ngram=None, agreement=RankAgreement(timeout_s=20))
            try:
                gen.generate(ids, NEW)
                result["error"] = None
            except Exception as err:  # noqa: BLE001 -- the test reads which error each rank got
                result["error"] = type(err).__name__
    finally:
        with open(os.path.join(out_dir, f"{scenario}-{rank}.json"), "w") as f:
            json.dump(result, f)
        if scenario != "die":
            dist.destroy_process_group()


def _run(scenario, model_dir, out_dir, timeout=240):
    """Both ranks in fresh processes; (exit codes, per-rank results)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, model_dir, str(out_dir), scenario)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(alive), f"{scenario}: rank(s) {[r for r, a in enumerate(alive) if a]} hung"
    results = []
    for r in range(2):
        path = os.path.join(out_dir, f"{scenario}-{r}.json")
        results.append(json.load(open(path)) if os.path.isfile(path) else None)
    return [p.exitcode for p in procs], results


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tp_model(request, tmp_path_factory):
    sys.path.insert(0, HERE)
    from support import tiny_causal_lm

    d = tmp_path_factory.mktemp(f"tp-{request.param}")
    tiny_causal_lm(request.param, 8, 2, seed=3).save_pretrained(d / "model")
    return request.param, str(d / "model"), d


def _unsharded(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_greedy_every_strategy_matches_unsharded_generate(tp_model, tmp_path):
    _, model_dir, _ = tp_model
    codes, (r0, r1) = _run("lossless", model_dir, tmp_path)
    assert codes == [0, 0], (codes, r0, r1)
    ref = _unsharded(model_dir).generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False)[0, len(PROMPT):]
    assert set(r0) == {"chain", "chain_c2t", "static", "eagle2", "c2t"}
    for name in r0:
        assert r0[name]["tokens"] == ref.tolist(), name
        assert r1[name]["tokens"] == ref.tolist(), name
        # the same trees on both ranks, sized by rank 0's cached profile, which rank 1 did not have
        assert r0[name]["verified"] == r1[name]["verified"], name
        assert r1[name]["profile"] == r0[name]["profile"] == _fixed_profile().verify_s
    assert any(v > 0 for name in r0 for v in r0[name]["verified"])  # trees were verified, not only plain steps


def test_seeded_sampling_same_on_both_ranks_and_unsharded(tp_model, tmp_path):
    sys.path.insert(0, HERE)
    from c2t_fast.decoding.cost import CostRule
    from c2t_fast.decoding.drafts import DraftLM
    from c2t_fast.decoding.engine import SpeculativeGenerator
    from support import tiny_causal_lm, tiny_strategies

    family, model_dir, _ = tp_model
    codes, (r0, r1) = _run("sampling", model_dir, tmp_path)
    assert codes == [0, 0], (codes, r0, r1)
    assert r0 == r1  # seed=None too: rank 0's fresh seed is everyone's
    target = _unsharded(model_dir)
    draft = DraftLM(tiny_causal_lm("llama", 4, 2, seed=2))
    for name, strategy in tiny_strategies().items():
        gen = SpeculativeGenerator(target, draft, strategy, eos_token_id=[], ngram=4,
                                   budget=CostRule(_fixed_profile(), draft_cost=0.002))
        assert gen.generate(torch.tensor(PROMPT), NEW, temperature=0.9, seed=11).tokens == r0[name], (family, name)


def test_mismatched_ranks_raise_on_every_rank(tp_model, tmp_path):
    family, model_dir, _ = tp_model
    if family != "llama":
        pytest.skip("one family is enough for the failure paths")
    codes, (r0, r1) = _run("mismatch", model_dir, tmp_path)
    assert codes == [0, 0], (codes, r0, r1)
    for r in (r0, r1):
        assert "different generation" in r["mismatch"], r
        assert r["after"] == r0["after"]
    assert (r0["bad_input"], r1["bad_input"]) == ("RankFailure", "ValueError")


@pytest.mark.parametrize("scenario", ["fail", "die"])
def test_a_failing_rank_ends_every_rank(tp_model, tmp_path, scenario):
    family, model_dir, _ = tp_model
    if family != "llama":
        pytest.skip("one family is enough for the failure paths")
    codes, (r0, r1) = _run(scenario, model_dir, tmp_path, timeout=120)
    assert r0 == {"error": "RankFailure"}, r0
    if scenario == "fail":
        assert codes == [0, 0] and r1 == {"error": "RuntimeError"}, (codes, r1)
    else:
        assert codes[1] == 3 and r1 is None, (codes, r1)
