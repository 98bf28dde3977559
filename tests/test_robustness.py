"""Regression tests for inputs that once crashed the interpreter, broke losslessness or left state
half-changed (issue #16): each input now gets a ValueError/TypeError naming the argument, raised before
anything is modified. Inputs that used to kill the process run in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import c2t_fast
import wisca_fast
from c2t_fast import ops, reference
from c2t_fast.decoding.classifier import C2TClassifier
from c2t_fast.decoding.drafts import DraftLM, EagleDraftHead
from c2t_fast.decoding.engine import SpeculativeGenerator
from c2t_fast.decoding.strategies import C2T, Chain, Eagle2
from support import tiny_causal_lm

HERE = os.path.dirname(os.path.abspath(__file__))


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a crash (signal) is a failed test, not a dead runner."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by a signal)\n{proc.stdout}\n{proc.stderr}"
    return proc


def _expect(code_lines: str) -> str:
    return "import torch, c2t_fast\nfrom c2t_fast import ops\n" + textwrap.dedent(code_lines)


# --- 1-3: inputs that killed the interpreter -------------------------------------------------------

def test_tree_attention_zero_heads_and_zero_head_dim_are_refused():
    run_isolated(_expect("""
        bits = c2t_fast.build_tree([-1, 0, 1, 2, 3]).ancestor_bits
        for q, k in ((torch.randn(1, 0, 5, 8), torch.randn(1, 2, 8, 8)),
                     (torch.randn(1, 2, 5, 8), torch.randn(1, 0, 8, 8)),
                     (torch.randn(1, 2, 5, 0), torch.randn(1, 2, 8, 0))):
            try:
                c2t_fast.tree_attention(q, k, k, bits, 3)
            except ValueError as e:
                assert "head" in str(e), e
            else:
                raise AssertionError("accepted")
    """))


def test_compact_kv_offsets_near_int64_max_are_refused():
    run_isolated(_expect("""
        for dtype in (torch.int8, torch.float32):
            c = torch.arange(64).to(dtype).view(1, 2, 8, 4)
            before = c.clone()
            try:
                c2t_fast.compact_kv([c], 4, torch.tensor([0, 2**63 - 3]))
            except ValueError as e:
                assert "accepted[1]" in str(e), e
            else:
                raise AssertionError("accepted")
            assert torch.equal(c, before)
    """))


def test_private_score_tail_validates_its_arguments():
    run_isolated(_expect("""
        tv, ti = torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long)
        w = (torch.zeros(4, 3), torch.zeros(4), torch.zeros(1, 4), torch.zeros(1))
        good = dict(lse=torch.zeros(2), pl=torch.zeros(2), k=2)
        bad = [dict(k=10**7), dict(k=4), dict(k=0), dict(lse=torch.zeros(3)), dict(pl=torch.zeros(1)),
               dict(lse=torch.zeros(2, dtype=torch.float64))]
        for b in bad:
            a = {**good, **b}
            try:
                torch.ops.c2t_fast._score_tail(tv, ti, a["lse"], a["pl"], 0.0, a["k"], *w, 0.5, False)
            except ValueError as e:
                assert "_score_tail" in str(e), e
            else:
                raise AssertionError(f"accepted {b}")
        for i, bad_w in enumerate([torch.zeros(4, 2), torch.zeros(3), torch.zeros(1, 3), torch.zeros(2)]):
            ws = list(w); ws[i] = bad_w
            try:
                torch.ops.c2t_fast._score_tail(tv, ti, good["lse"], good["pl"], 0.0, 2, *ws, 0.5, False)
            except ValueError:
                pass
            else:
                raise AssertionError(f"accepted weight {i}")
        torch.ops.c2t_fast._score_tail(tv, ti, good["lse"], good["pl"], 0.0, 2, *w, 0.5, False)
    """))


# --- 4: verify_sample inputs that break losslessness ---------------------------------------------------

def _sample_case():
    tokens = torch.tensor([0, 1, 2, 3])
    parents = torch.tensor([-1, 0, 0, 1], dtype=torch.int32)
    probs = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), -1)
    return tokens, parents, probs, torch.full((4,), 0.5, dtype=torch.float64)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("u", [-1e-9, -0.5, 1.0, 1.5, float("nan"), float("inf")])
def test_verify_sample_refuses_uniforms_outside_unit_interval(impl, u):
    tokens, parents, probs, uniforms = _sample_case()
    uniforms[2] = u
    fn = torch.ops.c2t_fast.verify_sample if impl == "op" else reference.verify_sample
    with pytest.raises(ValueError, match=r"uniforms\[2\]"):
        fn(tokens, parents, probs, uniforms)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("bad", ["nan", "neg", "zero", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_verify_sample_refuses_rows_that_are_not_distributions(impl, bad, dtype):
    tokens, parents, probs, uniforms = _sample_case()
    uniforms[1] = 0.0  # node 1 is accepted, so the walk reads row 1
    probs = probs.to(dtype)
    if bad == "nan":
        probs[1, 3] = float("nan")
    elif bad == "neg":
        probs[1, 3] = -0.01
    elif bad == "inf":
        probs[1, 3] = float("inf")
    else:
        probs[1] = 0
    fn = torch.ops.c2t_fast.verify_sample if impl == "op" else reference.verify_sample
    with pytest.raises(ValueError, match=r"probs\[1\]"):
        fn(tokens, parents, probs, uniforms)


def test_verify_sample_ignores_rows_its_walk_never_reads_like_the_reference():
    """Only the rows on the accepted path decide the verdict; the CPU kernel and the reference check
    exactly those (a full scan of [T, V] cost 40x the walk on the CPU; the CUDA binding scans all)."""
    tokens, parents, probs, uniforms = _sample_case()
    uniforms[1:] = 0.999999  # every child rejected at the root: only row 0 is read
    probs[2, 0] = float("nan")
    got = torch.ops.c2t_fast.verify_sample(tokens, parents, probs, uniforms)
    want = reference.verify_sample(tokens, parents, probs, uniforms)
    assert got[0].tolist() == want[0].tolist() == [0] and int(got[1]) == int(want[1])


def test_verify_sample_accepts_unnormalised_but_valid_rows_like_the_reference():
    tokens, parents, probs, uniforms = _sample_case()
    probs = probs * 3.0  # mass 3: the kernel renormalises by the row's mass
    probs[2, :3] = 0.0  # zeros are fine while the row keeps positive mass
    for u in (0.0, 0.3, 0.999999):
        uniforms[:] = u
        got = torch.ops.c2t_fast.verify_sample(tokens, parents, probs, uniforms)
        want = reference.verify_sample(tokens, parents, probs, uniforms)
        assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1])


# --- 5: WISCA and optimizer state ----------------------------------------------------------------

def _adam_step(model, opt):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    loss = model(ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def _snapshot(model, opt):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict())
    return params, state


def _assert_same(model, opt, snap):
    params, state = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    now = opt.state_dict()
    for pid, st in state["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(now["state"][pid][key], val), (pid, key)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("impl", ["default", "foreach", "fused"])
def test_wisca_amsgrad_rescale_is_refused_before_anything_changes(cls, impl):
    kw = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    model = tiny_causal_lm("llama", 8, 2, seed=3)
    opt = cls(model.parameters(), lr=1e-2, amsgrad=True, **kw)
    _adam_step(model, opt)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match="AMSGrad"):
        wisca_fast.apply(model, opt, optimizer_state="rescale")
    _assert_same(model, opt, snap)
    wisca_fast.apply(model, opt, optimizer_state="reset")  # reset clears the running maximum too
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (opt.state[q]["max_exp_avg_sq"] == 0).all() and (opt.state[q]["exp_avg_sq"] == 0).all()


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("impl", ["default", "foreach", "fused"])
def test_wisca_rescale_keeps_the_next_update_for_every_adam_implementation(cls, impl):
    """The README claims Adam/AdamW (foreach/fused too): after a transition with state 'rescale' the
    next update of every attention weight equals the update it would have had without the transition
    (Adam's step is invariant to the gradient's scale, and m /= c, v /= c^2 carry the state over)."""
    kw = {"foreach": True} if impl == "foreach" else {"fused": True} if impl == "fused" else {}
    kw["weight_decay"] = 0.0  # decoupled decay is proportional to the (rescaled) weight itself
    base = tiny_causal_lm("llama", 8, 2, seed=3)
    opt = cls(base.parameters(), lr=1e-2, eps=1e-12, **kw)
    _adam_step(base, opt)
    deltas = {}
    for mode in ("none", "rescale"):
        model = copy.deepcopy(base)
        o = cls(model.parameters(), lr=1e-2, eps=1e-12, **kw)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))
        if mode != "none":
            wisca_fast.apply(model, o, optimizer_state=mode)
        ws = {n: p.detach().clone() for n, p in model.named_parameters() if "self_attn" in n}
        _adam_step(model, o)
        deltas[mode] = {n: p.detach() - ws[n] for n, p in model.named_parameters() if n in ws}
    for n, d in deltas["none"].items():
        # atol: the fp32 rounding of w + delta at |w| ~ 10-50 (updates are ~1e-2); a wrong state is off by ~1e-2
        torch.testing.assert_close(deltas["rescale"][n], d, rtol=1e-3, atol=2e-5, msg=n)


@pytest.mark.parametrize("bad", [dict(granularity="row"), dict(norm="l3"), dict(clamp=(2.0, 1.0)),
                                 dict(optimizer_state="drop"), dict(lora="both")])
def test_wisca_bad_arguments_change_nothing(bad):
    model = tiny_causal_lm("llama", 8, 2, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _adam_step(model, opt)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=next(iter(bad))):
        wisca_fast.apply(model, opt, **bad)
    _assert_same(model, opt, snap)


def test_wisca_sgd_is_refused_before_anything_changes_on_a_lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm("llama", 8, 2, seed=3),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    _adam_step(model, opt)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match="Adam-family"):
        wisca_fast.apply(model, opt)
    _assert_same(model, opt, snap)


# --- 6: half-changed state -------------------------------------------------------------------------

def _prefilled(model, n=7):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.arange(1, n + 1)[None], past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("bits_kind", ["wrong_T", "wrong_dtype", "wrong_batch", "not_a_tensor"])
def test_bad_tree_bits_are_refused_before_the_cache_grows(bits_kind):
    model = c2t_fast.patch(tiny_causal_lm("llama", 6, 2, seed=1))
    cache = _prefilled(model)
    keys = [layer.keys.clone() for layer in cache.layers]
    b = c2t_fast.build_tree([-1, 0, 0, 1], 7)
    bits = {"wrong_T": c2t_fast.build_tree([-1, 0, 0], 7).ancestor_bits, "wrong_dtype": b.ancestor_bits.int(),
            "wrong_batch": b.ancestor_bits[None].expand(2, -1, -1), "not_a_tensor": [[1]]}[bits_kind]
    with pytest.raises(ValueError, match="c2t_tree_bits"):
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), position_ids=b.position_ids[None], past_key_values=cache,
              use_cache=True, c2t_tree_bits=bits)
    assert cache.get_seq_length() == 7
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, keys))


def test_tree_bits_on_an_unpatched_model_are_refused():
    model = c2t_fast.patch(tiny_causal_lm("llama", 6, 2, seed=1))
    c2t_fast.unpatch(model)
    b = c2t_fast.build_tree([-1, 0], 0)
    with pytest.raises(RuntimeError, match="not patched"):
        model(input_ids=torch.tensor([[5, 6]]), position_ids=b.position_ids[None], c2t_tree_bits=b.ancestor_bits)


def test_failed_generator_construction_leaves_the_target_unpatched():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    impl = target.config._attn_implementation
    other = tiny_causal_lm("llama", 6, 2, seed=1, vocab=120)
    for draft in (DraftLM(other), EagleDraftHead(other.config).attach(other)):
        with pytest.raises(ValueError, match="vocab_size"):
            SpeculativeGenerator(target, draft, Chain(3), budget=None, ngram=None)
        assert target.config._attn_implementation == impl and not c2t_fast.hf.attention.is_patched(target)


def test_a_deep_copy_of_a_patched_model_runs_repatches_and_unpatches():
    model = c2t_fast.patch(tiny_causal_lm("llama", 6, 2, seed=1))
    twin = copy.deepcopy(model)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        torch.testing.assert_close(twin(input_ids=ids).logits, ref)  # runs without re-patching
    assert c2t_fast.patch(twin) is twin
    cache = _prefilled(twin)
    b = c2t_fast.build_tree([-1, 0, 0], 7)
    with torch.no_grad():
        twin(input_ids=torch.tensor([[3, 4, 5]]), position_ids=b.position_ids[None], past_key_values=cache,
             c2t_tree_bits=b.ancestor_bits)
    c2t_fast.unpatch(twin)
    assert twin.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, ref)
    assert c2t_fast.hf.attention.is_patched(model)  # the original is untouched


# --- 7: aliasing ---------------------------------------------------------------------------------

def _overlapping():
    base = torch.randn(1, 2, 9, 4)
    return base[:, :, :8], base[:, :, 1:]  # same shape, rows shifted by one: they share 7 of 8 rows


def test_compact_kv_refuses_aliased_and_expanded_caches_and_accepts_disjoint_views():
    c = torch.randn(1, 2, 8, 4)
    acc = torch.tensor([0, 2])
    for caches, match in (([c, c], "same memory"), ([torch.randn(1, 1, 8, 4).expand(1, 2, 8, 4)], "expanded"),
                          (list(_overlapping()), "share memory"),
                          ([c.as_strided((1, 2, 8, 4), (64, 32, 2, 1))], "rows that share memory")):
        before = [t.clone() for t in caches]
        with pytest.raises(ValueError, match=match):
            c2t_fast.compact_kv(caches, 4, acc)
        assert all(torch.equal(t, b) for t, b in zip(caches, before))
    # K and V interleaved in one buffer ([B, S, 2, H, D]) are disjoint views: compacted like separate tensors
    kv = torch.randn(1, 8, 2, 2, 4)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    k_ref, v_ref = k.clone(), v.clone()
    reference.compact_kv([k_ref, v_ref], 4, acc)
    c2t_fast.compact_kv([k, v], 4, acc)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


# --- 8: silent conversions -----------------------------------------------------------------------

def test_int64_parents_outside_int32_and_huge_prefix_len_are_refused():
    for bad in (2 ** 31, 2 ** 32, -(2 ** 31) - 1):
        with pytest.raises(ValueError, match="parents"):
            c2t_fast.build_tree(torch.tensor([-1, 0, bad], dtype=torch.int64))
    for impl in (torch.ops.c2t_fast.build_tree, reference.build_tree):
        with pytest.raises(ValueError, match="prefix_len"):
            impl(torch.tensor([-1, 0, 1], dtype=torch.int32), 2 ** 63 - 2)
    b = c2t_fast.build_tree([-1, 0, 1], 2 ** 63 - 4)  # the largest that fits
    assert int(b.position_ids[-1]) == 2 ** 63 - 2


def test_verify_greedy_compares_fp64_logits_in_fp64():
    logits = torch.zeros(2, 4, dtype=torch.float64)
    logits[0, 1], logits[0, 2] = 1.0, 1.0 + 1e-12  # fp32 would call these equal and pick token 1
    got = c2t_fast.verify_greedy(torch.tensor([0, 2]), [-1, 0], logits)
    assert got.path.tolist() == [0, 1] and int(logits[0].argmax()) == 2


def _gen(target=None, strategy=None):
    target = target or tiny_causal_lm("llama", 6, 2, seed=1)
    return SpeculativeGenerator(target, DraftLM(tiny_causal_lm("llama", 4, 2, seed=2)), strategy or Chain(3),
                                eos_token_id=[], budget=None, ngram=None)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_k=1.5), "top_k"),
    (dict(top_k=-1), "top_k"), (dict(seed=-3), "seed"), (dict(seed=1.5), "seed")])
def test_generation_arguments_are_checked(kw, match):
    args = dict(max_new_tokens=5, **{k: v for k, v in kw.items() if k != "max_new_tokens"})
    if "max_new_tokens" in kw:
        args["max_new_tokens"] = kw["max_new_tokens"]
    with pytest.raises(ValueError, match=match):
        _gen().generate(torch.arange(1, 9), **args)


# --- 9: draft/target mismatch found at construction; the real tree size bounds the context -----------

def test_eagle_head_for_another_hidden_size_is_refused_at_construction():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    other = tiny_causal_lm("llama", 8, 2, seed=1)  # hidden 128 vs 96
    with pytest.raises(ValueError, match="hidden_size"):
        SpeculativeGenerator(target, EagleDraftHead(other.config).attach(other), Chain(3), budget=None, ngram=None)
    with pytest.raises(ValueError, match="attach"):
        SpeculativeGenerator(target, EagleDraftHead(target.config), Chain(3), budget=None, ngram=None)


def test_context_check_uses_the_strategys_real_tree_size():
    target = tiny_causal_lm("llama", 6, 2, seed=1)
    target.config.max_position_embeddings = 40
    gen = _gen(target, Chain(4))
    # the last root sits at position 20 + 17 - 2 = 35 and a chain of 4 reaches 39 < 40: runs
    out = gen.generate(torch.arange(1, 21), max_new_tokens=17)
    assert len(out.tokens) == 17
    with pytest.raises(ValueError, match="context of 40"):
        gen.generate(torch.arange(1, 21), max_new_tokens=18)
    deep = _gen(target, Eagle2(top_k=4, depth=9, total_tokens=20))
    with pytest.raises(ValueError, match="depth up to 10"):  # 20 + 12 - 2 + 10 = 40: one past the end
        deep.generate(torch.arange(1, 21), max_new_tokens=12)
    assert len(deep.generate(torch.arange(1, 21), max_new_tokens=11).tokens) == 11


# --- 11: sampling randomness -----------------------------------------------------------------------

def test_sampling_without_a_seed_is_fresh_and_with_a_seed_repeats():
    gen = _gen()
    ids = torch.arange(1, 9)
    unseeded = {tuple(gen.generate(ids, max_new_tokens=24, temperature=1.5).tokens) for _ in range(3)}
    assert len(unseeded) > 1  # 3 draws of 24 tokens from ~97-way distributions: equal by chance ~never
    seeded = {tuple(gen.generate(ids, max_new_tokens=24, temperature=1.5, seed=7).tokens) for _ in range(2)}
    assert len(seeded) == 1


# --- 10: CLI user errors: one line naming the file, exit status 2 ----------------------------------------

def _cli(*argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "c2t_fast.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in line, line


def test_draft_head_loading_errors_name_the_file(tmp_path):
    from c2t_fast.decoding.drafts.loading import load_draft

    target = tiny_causal_lm("llama", 6, 2, seed=1)
    head = EagleDraftHead(target.config).attach(target)
    good = tmp_path / "good"
    head.save_pretrained(str(good))
    trunc = tmp_path / "truncated"
    trunc.mkdir()
    (trunc / "config.json").write_text((good / "config.json").read_text())
    data = (good / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    no_cfg = tmp_path / "no_target_config"
    no_cfg.mkdir()
    (no_cfg / "config.json").write_text(json.dumps({"draft_type": "eagle_head"}))
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    for d, needle in ((trunc, "model.safetensors"), (no_cfg, "target_config"), (bad_json, "not valid JSON")):
        with pytest.raises(ValueError, match=needle) as err:
            load_draft(str(d), target)
        assert str(d) in str(err.value)


def test_cli_user_errors_are_one_line_with_exit_status_2(tmp_path):
    no_turns = tmp_path / "q.jsonl"
    no_turns.write_text(json.dumps({"question_id": 1, "text": "hi"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    trunc = tmp_path / "head"
    trunc.mkdir()
    (trunc / "config.json").write_text(json.dumps({"draft_type": "eagle_head"}))
    _assert_user_error(_cli("bench", "--prompts", str(no_turns), "--strategies", "ar", "--out", str(tmp_path / "o")),
                       str(no_turns), "turns")
    _assert_user_error(_cli("bench", "--prompts", str(empty), "--strategies", "ar", "--out", str(tmp_path / "o")),
                       str(empty), "no prompts")
    _assert_user_error(_cli("generate", "--prompt", "hi", "--draft", str(trunc), "--max-new-tokens", "2",
                            "--no-baseline"), "target_config")


def test_compact_dynamic_cache_and_patch_errors_leave_everything_as_it_was():
    from c2t_fast.hf.attention import compact_dynamic_cache

    model = c2t_fast.patch(tiny_causal_lm("llama", 6, 2, seed=1))
    cache = _prefilled(model, 9)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    for bad in (torch.tensor([0, 0]), torch.tensor([3, 1]), torch.tensor([0, 9]), torch.tensor([0, 2 ** 62]),
                torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="accepted"):
            compact_dynamic_cache(cache, 5, bad)
        assert cache.get_seq_length() == 9
        assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
                   for layer, (k, v) in zip(cache.layers, before))
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    impl = gpt2.config._attn_implementation
    with pytest.raises(ValueError, match="supports the model families"):
        c2t_fast.patch(gpt2)
    assert gpt2.config._attn_implementation == impl and not hasattr(gpt2, "_c2t_fast_base_attn_impl")
