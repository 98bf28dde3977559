"""When does WISCA help? Learning-rate sweep, mechanism controls and transition schedules, pre-training
a small GQA Llama from scratch (issue 19).

    python -m experiments.wisca.study --out runs/wisca_study                 # the CPU defaults below
    python -m experiments.wisca.study --out runs/wisca_study --phase report  # tables and plots only
    python -m experiments.wisca.study --hidden 256 --layers 6 --vocab 16384 --seq-len 256 --steps 10000 \\
        --lrs 3e-4,6e-4,1.2e-3,2.4e-3,4.8e-3 --workers 8                         # bigger hardware

Phase ``sweep``: baseline, WISCA (QK + VO), WISCA VO-only, WISCA QK-only (tensor-wise L1, at init and
every 250 steps, Adam moments rescaled) at every ``--lrs`` value, every seed, every ``--groups`` GQA group
size. Phase ``followup``, at the best sweep LR of the baseline and of WISCA (both, when they differ):

- ``every1000`` / ``init_only``: WISCA transitions every 1000 steps / only at initialisation;
- ``balanced_init``: Q/K and V/O *initialised* balanced (rows of W_q, W_k, W_v and columns of W_o scaled
  by the ratio of the matrices' expected L1 norms, from their shapes alone), no transitions;
- ``per_matrix_lr``: the baseline with no rescaling at all, but AdamW learning rates per matrix set to
  what WISCA's init factors (s, t) imply for the relative step: W_q lr/s, W_k lr·s, W_v lr/t, W_o lr·t
  (weight decay per group lr·wd/lr_g, so the decoupled decay is unchanged). Adam's update is invariant to
  a gradient's scale, so in exact arithmetic this differs from ``init_only`` only through gradient
  clipping (the global norm is taken in different coordinates) and Adam's eps.

Every configuration at a learning rate and seed starts from the same initialisation and batch order as the
baseline. Runs go to ``OUT/g{G}/{config}/lr{LR}/seed{N}.json`` (reruns skip finished ones; checkpoints
inside a run every ``--ckpt-every`` steps); ``--workers`` processes of one thread each share the jobs.
``report`` writes ``summary.json``, ``summary.md``, ``lr_sweep.png`` and ``loss_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from .common import load_done, mean_lm_loss, mean_spread, save_run, train_loop
from .corpus import build_corpus
from .pretrain import make_model

SWEEP = {  # name -> WiscaScheduler kwargs (None: no WISCA)
    "baseline": None,
    "wisca": dict(every=250),
    "vo_only": dict(every=250, qk=False),
    "qk_only": dict(every=250, vo=False),
}
FOLLOWUP = {
    "every1000": dict(every=1000),
    "init_only": dict(every=0),
    "balanced_init": None,
    "per_matrix_lr": None,
}
CONFIGS = {**SWEEP, **FOLLOWUP}


def run_name(group: int, config: str, lr: float) -> str:
    return os.path.join(f"g{group}", config, f"lr{lr:g}")


def balance_init_(model) -> list[tuple[float, float]]:
    """Scale W_q/W_k rows and W_v rows / W_o columns so the pairs' *expected* L1 norms match, from the
    matrices' shapes (every projection starts from the same i.i.d. normal): s = sqrt(n_k / n_q),
    t = sqrt(n_o / n_v). The attention output distribution is unchanged (q·k and W_o W_v are)."""
    from wisca_fast.models import find_attention

    out = []
    with torch.no_grad():
        for lay in find_attention(model).layers:
            wq, wk, wv, wo = (p.linear.weight for p in (lay.q, lay.k, lay.v, lay.o))
            s, t = math.sqrt(wk.numel() / wq.numel()), math.sqrt(wo.numel() / wv.numel())
            wq.mul_(s), wk.div_(s), wv.mul_(t), wo.div_(t)
            out.append((s, t))
    return out


def per_matrix_groups(model, lr: float, weight_decay: float) -> tuple[list[dict], list[tuple[float, float]]]:
    """AdamW parameter groups for the per-matrix-LR control: per layer, WISCA's tensor-wise L1 factors
    (s, t) of the *current* weights (the ones a WISCA transition at init would apply) turned into learning
    rates W_q lr/s, W_k lr*s, W_v lr/t, W_o lr*t; every other parameter at ``lr``. Each group's
    ``weight_decay`` is ``weight_decay * lr / lr_g`` so that lr_g * wd_g, the decoupled decay, stays."""
    from wisca_fast.factors import layer_multipliers
    from wisca_fast.models import find_attention

    spec = find_attention(model)
    groups, factors, special = [], [], set()
    for lay in spec.layers:
        ws = [p.linear.weight for p in (lay.q, lay.k, lay.v, lay.o)]
        _, f = layer_multipliers(*(w.detach() for w in ws), spec.num_heads, spec.num_kv_heads, spec.head_dim)
        s, t = float(f[0]), float(f[1])
        factors.append((s, t))
        for w, mult in zip(ws, (1 / s, s, 1 / t, t)):
            groups.append({"params": [w], "base_lr": lr * mult, "lr": lr * mult, "weight_decay": weight_decay / mult})
            special.add(id(w))
    rest = [p for p in model.parameters() if id(p) not in special]
    groups.append({"params": rest, "base_lr": lr, "lr": lr, "weight_decay": weight_decay})
    return groups, factors


def train_job(job: dict) -> dict:
    """One (group, config, lr, seed) run; saves and returns its result JSON (``run_jobs`` skips finished
    runs, a checkpoint inside the run resumes it)."""
    from wisca_fast import WiscaScheduler

    torch.set_num_threads(job["threads"])
    a = argparse.Namespace(**job["settings"])
    group, config, lr, seed = job["group"], job["config"], job["lr"], job["seed"]
    name = run_name(group, config, lr)
    corpus = build_corpus(os.path.join(a.out, "cache"), a.seq_len, a.vocab, a.sharegpt, progress=False)
    model = make_model(corpus["vocab"], a.hidden, a.layers, a.heads, a.heads // group, a.seq_len, seed)
    factors = None
    if config == "balanced_init":
        factors = balance_init_(model)
    if config == "per_matrix_lr":
        groups, factors = per_matrix_groups(model, lr, a.weight_decay)
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    wisca = CONFIGS[config]
    sched = WiscaScheduler(model, opt, **wisca) if wisca else None
    order = torch.randperm(corpus["train"].shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    val = corpus["val"][: a.val_blocks]
    os.makedirs(os.path.join(a.out, name), exist_ok=True)
    run_args = argparse.Namespace(**{**vars(a), "lr": lr})
    state = train_loop(model, opt, list(model.parameters()), corpus["train"], order,
                       lambda: mean_lm_loss(model, val, a.batch), sched, run_args,
                       os.path.join(a.out, name, f"seed{seed}.ckpt.pt"), f"g{group} {config} lr {lr:g} s{seed}",
                       eval_at_start=True)
    tail = state["history"][-a.tail:]
    result = {"config": config, "group": group, "lr": lr, "seed": seed,
              "params": sum(p.numel() for p in model.parameters()),
              "final_train_loss": sum(tail) / len(tail), "val_loss": state["evals"][-1][1],
              "val_ppl": math.exp(state["evals"][-1][1]), "history": state["history"], "evals": state["evals"],
              "transitions": state["transitions"], "init_factors": factors, "seconds": state["elapsed"],
              "threads": job["threads"], "settings": job["settings"]}
    save_run(a.out, name, seed, result)
    return result


def _label(job: dict, r: dict) -> str:
    return (f"g{job['group']} {job['config']} lr {job['lr']:g} seed {job['seed']}: val loss {r['val_loss']:.4f}"
            f" ({r['seconds']:.0f} s)")


def run_jobs(jobs: list[dict], workers: int) -> None:
    """Seed-major job order, so every configuration has a first seed before any has a third."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not load_done(j["settings"]["out"], run_name(j["group"], j["config"], j["lr"]),
                                             j["seed"])]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="runs")
    if workers <= 1:
        for j in todo:
            bar.write(_label(j, train_job(j)))
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for j, r in zip(todo, pool.map(train_job, todo)):
                bar.write(_label(j, r))
                bar.update(1)
    bar.close()


def results(out: str) -> dict:
    """{(group, config, lr): [result per seed]} of every finished run under ``out``."""
    import glob

    found: dict = {}
    for path in sorted(glob.glob(os.path.join(out, "g*", "*", "lr*", "seed*.json"))):
        r = json.load(open(path))
        found.setdefault((r["group"], r["config"], r["lr"]), []).append(r)
    return found


def best_lrs(found: dict, group: int, config: str, metric: str = "val_loss") -> list[tuple[float, dict]]:
    """[(lr, mean/spread of ``metric``)] of ``config`` at ``group``, best (lowest mean) first."""
    rows = [(lr, mean_spread([r[metric] for r in rs])) for (g, c, lr), rs in found.items() if g == group and c == config]
    return sorted(rows, key=lambda x: x[1]["mean"])


def followup_lrs(found: dict, group: int) -> list[float]:
    """The best sweep LR of the baseline and of WISCA (one LR when they agree)."""
    lrs = []
    for config in ("baseline", "wisca"):
        ranked = best_lrs(found, group, config)
        if ranked and ranked[0][0] not in lrs:
            lrs.append(ranked[0][0])
    return lrs


def make_jobs(args, configs, lrs_of, seeds, threads) -> list[dict]:
    settings = {k: v for k, v in vars(args).items() if k not in ("phase", "workers")}
    return [dict(group=g, config=c, lr=lr, seed=s, threads=threads, settings=settings)
            for s in seeds for g in args.groups for c in configs for lr in lrs_of(g)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/wisca_study")
    p.add_argument("--phase", default="all", choices=["all", "sweep", "followup", "report"])
    p.add_argument("--groups", default="4,8", type=lambda s: [int(x) for x in s.split(",")],
                   help="GQA group sizes (query heads per KV head)")
    p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3,1.2e-2", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024, help="compacted vocabulary size; 0 = SmolLM2's full one")
    p.add_argument("--sharegpt", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--val-blocks", type=int, default=256)
    p.add_argument("--tail", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    args = p.parse_args(argv)
    bad = [g for g in args.groups if g < 1 or args.heads % g]
    if bad:
        p.error(f"--groups {bad}: each must divide --heads {args.heads}")
    if min(args.lrs) <= 0 or args.steps < 1:
        p.error("--lrs must be positive and --steps at least 1")
    corpus = build_corpus(os.path.join(args.out, "cache"), args.seq_len, args.vocab, args.sharegpt)
    print("corpus:", corpus["stats"])
    threads = 1 if args.workers > 1 else torch.get_num_threads()
    if args.phase in ("all", "sweep"):
        run_jobs(make_jobs(args, list(SWEEP), lambda g: args.lrs, args.seeds, threads), args.workers)
    if args.phase in ("all", "followup"):
        found = results(args.out)
        missing = [(g, c) for g in args.groups for c in ("baseline", "wisca") if not best_lrs(found, g, c)]
        if missing:
            p.error(f"followup needs the sweep's baseline and WISCA runs first; missing {missing}")
        run_jobs(make_jobs(args, list(FOLLOWUP), lambda g: followup_lrs(found, g), args.seeds, threads), args.workers)
    from .study_report import write_study_report

    write_study_report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
