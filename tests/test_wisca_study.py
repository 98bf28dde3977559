"""The WISCA study's controls and driver at toy sizes: balanced init preserves the model's function, the
per-matrix learning rates reproduce WISCA's training steps without any rescaling, and the sweep ->
follow-up -> report pipeline runs, resumes and picks its follow-up learning rates from the sweep."""

import copy
import json
import os

import pytest
import torch

from experiments.wisca import study
from experiments.wisca.common import run_path
from experiments.wisca.pretrain import make_model

TINY = ["--steps", "4", "--batch", "2", "--seq-len", "16", "--hidden", "32", "--layers", "1", "--heads", "8",
        "--vocab", "256", "--sharegpt", "8", "--eval-every", "2", "--val-blocks", "4", "--ckpt-every", "2",
        "--tail", "2", "--seeds", "0", "--lrs", "1e-3,4e-3", "--workers", "1"]


def _model(group=4, seed=0):
    return make_model(128, 64, 2, 8, 8 // group, 32, seed)


def _weights(model):
    from wisca_fast.models import find_attention

    return [[p.linear.weight for p in (lay.q, lay.k, lay.v, lay.o)] for lay in find_attention(model).layers]


@pytest.mark.parametrize("group", [1, 4, 8])
def test_balanced_init_keeps_the_function_and_balances_l1(group):
    model = _model(group)
    x = torch.randint(0, 128, (2, 12))
    before = model(input_ids=x).logits
    factors = study.balance_init_(model)
    torch.testing.assert_close(model(input_ids=x).logits, before, rtol=1e-4, atol=1e-5)
    assert factors[0] == pytest.approx((group ** -0.5, group ** 0.5))
    for wq, wk, wv, wo in _weights(model):
        # i.i.d. init: after scaling by the shape ratio the L1 norms agree up to sampling noise
        assert float(wq.detach().abs().sum() / wk.detach().abs().sum()) == pytest.approx(1.0, rel=0.1)
        assert float(wo.detach().abs().sum() / wv.detach().abs().sum()) == pytest.approx(1.0, rel=0.1)


def test_per_matrix_groups_follow_wiscas_factors():
    from wisca_fast.factors import layer_multipliers

    model = _model(4)
    groups, factors = study.per_matrix_groups(model, 2e-3, 0.1)
    assert len(groups) == 4 * 2 + 1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for (wq, wk, wv, wo), (s, t), gs in zip(_weights(model), factors, [groups[i:i + 4] for i in (0, 4)]):
        _, f = layer_multipliers(wq.detach(), wk.detach(), wv.detach(), wo.detach(), 8, 2, 8)
        assert (s, t) == pytest.approx((float(f[0]), float(f[1])))
        assert [g["params"][0] for g in gs] == [wq, wk, wv, wo]
        assert [g["base_lr"] for g in gs] == pytest.approx([2e-3 / s, 2e-3 * s, 2e-3 / t, 2e-3 * t])
        for g in gs:  # the decoupled decay lr * wd is the same for every group
            assert g["base_lr"] * g["weight_decay"] == pytest.approx(2e-3 * 0.1)
    assert groups[-1]["base_lr"] == 2e-3 and groups[-1]["weight_decay"] == 0.1


def test_per_matrix_lr_reproduces_init_only_wisca_without_rescaling():
    """Adam ignores a gradient's scale, so WISCA's rescaling at init is the same training run as the
    baseline with per-matrix learning rates (no clipping here; Adam's eps is negligible)."""
    from wisca_fast import WiscaScheduler

    torch.manual_seed(0)
    a = _model(4)
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    WiscaScheduler(a, opt_a, every=0)
    groups, _ = study.per_matrix_groups(b, 3e-3, 0.1)
    opt_b = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
    opt_c = torch.optim.AdamW(c.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, 128, (6, 4, 17))
    for step in range(6):
        for m, opt in ((a, opt_a), (b, opt_b), (c, opt_c)):
            logits = m(input_ids=x[step, :, :-1]).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[step, :, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    probe = torch.randint(0, 128, (2, 16))
    la, lb, lc = (m(input_ids=probe).logits for m in (a, b, c))
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-4)
    assert (lc - la).abs().max() > 100 * (lb - la).abs().max()  # the plain baseline is a different run


def test_study_sweeps_follows_up_and_reports(tmp_path):
    out = str(tmp_path / "study")
    with pytest.raises(SystemExit):  # no sweep yet: the follow-up has no learning rate to pick
        study.main(["--out", out, "--phase", "followup", "--groups", "4", *TINY])
    assert study.main(["--out", out, "--phase", "sweep", "--groups", "4,8", *TINY]) == 0
    found = study.results(out)
    assert {(g, c) for g, c, _ in found} == {(g, c) for g in (4, 8) for c in study.SWEEP}
    base = found[(4, "baseline", 1e-3)][0]
    wisca = found[(4, "wisca", 1e-3)][0]
    assert wisca["history"][0] == pytest.approx(base["history"][0], abs=1e-5)  # output-preserving at init
    assert [t[0] for t in wisca["transitions"]] == [0] and base["transitions"] == []
    assert [e[0] for e in base["evals"]] == [0, 2, 4]
    mtime = os.path.getmtime(run_path(out, study.run_name(4, "baseline", 1e-3), 0))
    assert study.main(["--out", out, "--phase", "all", "--groups", "4,8", *TINY]) == 0  # sweep skipped, follow-up run
    assert os.path.getmtime(run_path(out, study.run_name(4, "baseline", 1e-3), 0)) == mtime
    found = study.results(out)
    for g in (4, 8):
        lrs = study.followup_lrs(found, g)
        assert lrs and {lr for gg, c, lr in found if gg == g and c == "per_matrix_lr"} == set(lrs)
    summary = json.load(open(os.path.join(out, "summary.json")))
    best = summary["g4"]["best"]
    assert set(best) == set(study.CONFIGS)
    assert best["baseline"]["lr"] == study.best_lrs(found, 4, "baseline")[0][0]
    assert "vs_baseline_at_its_best" in best["wisca"]
    text = open(os.path.join(out, "summary.md")).read()
    assert "### GQA group 8" in text and "| per_matrix_lr |" in text
    runs = json.load(open(os.path.join(out, "runs.json")))
    assert len(runs) == sum(len(rs) for rs in found.values()) and "history" not in runs[0]
    assert runs[0]["train_loss_means"] and runs[0]["val_loss"] > 0
    assert os.path.getsize(os.path.join(out, "lr_sweep.png")) > 0
    assert os.path.getsize(os.path.join(out, "loss_curves.png")) > 0


def test_study_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path), "--groups", "3", *TINY])
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path), *TINY, "--lrs", "0,1e-3"])
