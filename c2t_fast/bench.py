"""The benchmark harness behind ``c2t-fast bench``: strategies and parameter sweeps over a question file,
with plain decoding and transformers' prompt lookup as baselines run in the same process, per-question
results (JSONL), a summary (JSON + markdown table) and the tau-gamma plot.

The per-step quantities (``decoding.metrics``): tau = accepted draft tokens per step, gamma = draft
tokens verified per step; speed-ups are tokens/s against plain decoding of the same target, measured
in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch

from .decoding.engine import SpeculativeGenerator
from .decoding import defaults
from .decoding.defaults import make_strategy  # noqa: F401  (c2t_fast.bench.make_strategy, as before)
from .decoding.drafts.loading import load_draft
from .decoding.metrics import Metrics
from .decoding.strategies import STRATEGIES, strategy_parameters
from .hf.adapter import TargetAdapter, chat_stop_ids, encode_chat
from .kernels.skinny_linear import stock_linear
from .hf.loading import load_target

# rows that run the target's own generate(): plain decoding and prompt lookup on the target as loaded (its
# linear layers through the skinny kernel on a CPU), and plain decoding with torch's own linear layers
BASELINES = ("ar", "prompt_lookup", "ar_stock")
PROMPT_LOOKUP_TOKENS = 10  # transformers' prompt_lookup_num_tokens for the prompt-lookup baseline


@dataclass
class BenchConfig:
    """One ``c2t-fast bench`` run. ``params``: fixed strategy settings, each applied to the strategies
    that take it; ``sweeps``: the settings to run each strategy at (``parse_sweeps``)."""

    prompts: str
    out: str
    strategies: tuple = ("c2t", "eagle2")
    sweeps: list = field(default_factory=lambda: [{}])
    params: dict = field(default_factory=dict)
    target: str = "smollm2"
    draft: str | None = None
    draft_full_vocab: bool = False
    classifier: str | None = None
    max_new_tokens: int = 256
    limit: int | None = None
    temperature: float = 0.0
    seed: int = 0
    device: str = "auto"  # "auto": the GPU when there is one
    ngram: tuple = (defaults.NGRAM_TOKENS,)  # n-gram branch lengths to run each strategy with (0: none)
    budget: tuple = (defaults.BUDGET,)  # tree sizing to run each strategy with: "none" (as grown), "auto" (by cost)
    stock_linear: bool = False  # the target with torch's linear layers everywhere (no skinny kernel)
    # datastores to run each strategy with: "default" (the main job's), "shipped", "none" or a directory
    datastore: tuple = (defaults.DEFAULT,)
    recycling: tuple = (defaults.DEFAULT,)  # Token Recycling's branches: the main job's ("default"), off (0), on (1)


def read_prompts(path: str, limit: int | None = None) -> list[tuple]:
    """(question_id, category, first turn) of each JSONL line (spec_bench's question format)."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err})") from None
            turns = q.get("turns") if isinstance(q, dict) else None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise ValueError(f"{path}:{n}: expected an object with \"turns\": [\"<first user turn>\", ...]")
            prompts.append((q.get("question_id", len(prompts)), q.get("category", ""), turns[0]))
    if not prompts:
        raise ValueError(f"{path}: no prompts (expected JSONL lines with \"turns\")")
    return prompts[:limit] if limit else prompts


def sweepable() -> dict[str, type]:
    """Every numeric strategy parameter and its type (bool and tuple settings are not swept)."""
    out = {}
    for name in STRATEGIES:
        for key, default in strategy_parameters(name).items():
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                out[key] = float if isinstance(default, float) else int
    return out


def parse_sweeps(values: list[str] | None) -> list[dict]:
    """``["beta=0.3,0.5", "total_tokens=20,40"]`` -> the settings of their product (each applies to the
    strategies that take it)."""
    kinds = sweepable()
    out = [{}]
    for spec in values or []:
        key, _, vals = spec.partition("=")
        key = key.replace("-", "_")
        key = defaults.param_name(key)
        if key not in kinds or not vals:
            raise ValueError(f"--sweep {spec!r}: expected NAME=v1,v2 with NAME in {sorted(kinds)}")
        try:
            parsed = [kinds[key](v) for v in vals.split(",")]
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: {key} takes {kinds[key].__name__} values") from None
        out = [{**o, key: v} for o in out for v in parsed]
    return out


def _runs(names, sweeps, ngram=(0,), budget=("none",), datastore=(defaults.DEFAULT,),
          recycling=(defaults.DEFAULT,)) -> list[tuple[str, dict]]:
    """(strategy, setting) pairs: each strategy at each distinct setting it takes, each with and without
    n-gram branches as ``ngram`` lists (setting key "ngram": tokens per branch), with each ``budget``
    (setting key "budget" for "auto"), each ``datastore`` and each ``recycling`` (keys "datastore",
    "recycling" 0 / 1 only where they differ from the main job's "default"); baselines once."""
    for b in budget:
        if b not in ("none", "auto"):
            raise ValueError(f"budget {b!r}: expected none or auto")
    runs = []
    for name in names:
        if name in BASELINES:
            runs.append((name, {}))
            continue
        own, seen = strategy_parameters(name), set()
        for sweep in sweeps:
            setting = {k: v for k, v in sweep.items() if k in own}
            if tuple(sorted(setting.items())) not in seen:
                seen.add(tuple(sorted(setting.items())))
                runs += [(name, {**setting, **({"ngram": n} if n else {}), **({"budget": b} if b != "none" else {}),
                                 **({"datastore": ds} if ds != defaults.DEFAULT else {}),
                                 **({"recycling": int(r)} if r != defaults.DEFAULT else {})})
                         for n in ngram for b in budget for ds in datastore for r in recycling]
    return runs


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Runs every (strategy, setting) over the prompts; writes ``results.jsonl``, ``summary.json``,
    ``summary.md`` and ``tau_gamma.png`` to ``cfg.out``; returns the summary."""
    from tqdm.auto import tqdm

    for name in cfg.strategies:
        if name not in STRATEGIES and name not in BASELINES:
            raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES) + list(BASELINES)}")
    runs = _runs(cfg.strategies, cfg.sweeps, cfg.ngram, cfg.budget, cfg.datastore, cfg.recycling)
    target, tok = load_target(cfg.target, device=cfg.device, fast_linear=False if cfg.stock_linear else None)
    adapter = TargetAdapter(target)
    needs_draft = any(n not in BASELINES for n in cfg.strategies)
    draft = load_draft(cfg.draft, target, cfg.draft_full_vocab) if needs_draft else None
    prompts = read_prompts(cfg.prompts, cfg.limit)
    os.makedirs(cfg.out, exist_ok=True)
    stop = chat_stop_ids(tok)
    rows = []
    with open(os.path.join(cfg.out, "results.jsonl"), "w") as f:
        for name, setting in tqdm(runs, desc="settings", disable=not progress):
            if name not in BASELINES:
                strategy = make_strategy(name, cfg.classifier, {**cfg.params, **setting})
                gen = SpeculativeGenerator(target, draft, strategy, stop_token_ids=stop,
                                           ngram=setting.get("ngram", 0), budget=setting.get("budget"),
                                           **defaults.load_sources(setting.get("datastore", defaults.DEFAULT),
                                                        setting.get("recycling", defaults.DEFAULT), target))
            tot = Metrics()  # the row: every prompt's generation accumulated
            for i, (qid, cat, text) in enumerate(tqdm(prompts, desc=f"{name} {setting}", leave=False,
                                                      disable=not progress)):
                ids = encode_chat(tok, text)
                if name in BASELINES:
                    n, dt = _baseline(adapter, ids, name, cfg, stop, cfg.seed + i)
                    rec = {"strategy": name, "question_id": qid, "category": cat, "new_tokens": n,
                           "total_time_s": round(dt, 4), "tokens_per_s": round(n / dt, 2)}
                    tot.add(Metrics(new_tokens=n, total_time=dt))
                else:
                    out = gen.generate(ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       seed=cfg.seed + i if cfg.temperature > 0 else None)
                    rec = {"strategy": name, **setting, "question_id": qid, "category": cat, **out.metrics.summary()}
                    tot.add(out.metrics)
                f.write(json.dumps(rec) + "\n")
            rows.append(_row(name, setting, tot))
            # the row a user gets with no flags: the main job's strategy and settings, shipped draft and classifier
            rows[-1]["default"] = (defaults.is_default_setting(name, setting) and cfg.draft is None
                                   and all(v is None for v in cfg.params.values())
                                   and cfg.classifier is None and not cfg.stock_linear)
    ar = next((r["tokens_per_s"] for r in rows if r["strategy"] == "ar"), None)
    for r in rows:
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar if ar else None
    meta = {"prompts": cfg.prompts, "questions": len(prompts), "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "draft": cfg.draft, "classifier": cfg.classifier,
            "threads": torch.get_num_threads(), "device": str(adapter.device)}
    summary = {"meta": meta, "rows": rows}
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = format_table(rows)
    with open(os.path.join(cfg.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    curves = {name: [(r["gamma_per_step"], r["tau"]) for r in rows if r["strategy"] == name and r["tau"] is not None]
              for name in dict.fromkeys(r["strategy"] for r in rows)}
    plot_tau_gamma(curves, os.path.join(cfg.out, "tau_gamma.png"), f"τ–γ: {os.path.basename(cfg.prompts)}")
    return summary


def _baseline(adapter: TargetAdapter, ids, name: str, cfg: BenchConfig, stop, seed: int) -> tuple[int, float]:
    """(new tokens, seconds) of plain decoding ("ar"; "ar_stock": with torch's linear layers) or
    prompt-lookup assisted decoding."""
    import time

    if cfg.temperature > 0:
        torch.manual_seed(seed)
    with stock_linear(adapter.model) if name == "ar_stock" else contextlib.nullcontext():
        t = time.perf_counter()
        new = adapter.generate(ids, cfg.max_new_tokens, stop_ids=stop, temperature=cfg.temperature,
                               prompt_lookup_tokens=PROMPT_LOOKUP_TOKENS if name == "prompt_lookup" else 0)
        return new.numel(), time.perf_counter() - t


def _row(name: str, setting: dict, tot: Metrics) -> dict:
    steps = tot.steps
    per_step = (lambda x: x / steps) if steps else (lambda x: None)
    return {"strategy": name, "setting": setting, "tau": per_step(sum(tot.accepted)),
            "accept_length": per_step(tot.new_tokens), "gamma_per_step": per_step(tot.gamma),
            "gamma": tot.gamma, "new_tokens": tot.new_tokens,
            "tokens_per_s": tot.new_tokens / max(tot.total_time, 1e-9),
            "draft_time_s": tot.draft_time, "verify_time_s": tot.verify_time,
            "plain_share": per_step(tot.plain_steps)}


def format_table(rows: list[dict]) -> str:
    """The summary rows as a markdown table."""
    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    lines = ["| strategy | setting | tau | accept len | gamma/step | plain steps | tokens/s | vs AR | draft s | verify s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']}{' (default)' if r.get('default') else ''} | {r['setting'] or ''} | {fmt(r['tau'], '.3f')} | {fmt(r['accept_length'], '.3f')}"
                     f" | {fmt(r['gamma_per_step'], '.1f')} | {fmt(r.get('plain_share'), '.0%')} | {r['tokens_per_s']:.2f}"
                     f" | {fmt(r['speedup_vs_ar'], '.2f')}"
                     f" | {r['draft_time_s']:.1f} | {r['verify_time_s']:.1f} |")
    return "\n".join(lines)


def plot_tau_gamma(curves: dict, path: str, title: str, styles: dict | None = None) -> bool:
    """One line per curve: ``curves[label]`` is a list of (gamma per step, tau) points, joined in order of
    gamma (``styles[label]``: its matplotlib format, default "o-"). Writes nothing and returns False when
    no curve has a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: sorted(pts) for label, pts in curves.items() if pts}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], (styles or {}).get(label, "o-"), label=label)
    ax.set(xlabel="γ: draft tokens verified per step", ylabel="τ: accepted draft tokens per step", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
