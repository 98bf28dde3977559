"""The ``c2t-fast`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train_classifier(args) -> int:
    from .classifier import ClassifierConfig
    from .classifier_training import TrainConfig, train_classifier

    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, min_steps=args.min_steps,
                      neg_ratio=args.neg_ratio, neg_sampling=args.neg_sampling,
                      val_fraction=args.val_fraction, seed=args.seed, finetune_from=args.finetune_from,
                      finetune_fraction=args.finetune_fraction,
                      model=ClassifierConfig(hidden=args.hidden, features=args.features.split(","), log_p=args.log_p))
    report = train_classifier(args.data, args.out, cfg)
    print(json.dumps({"selected_epoch": report["selected_epoch"], **report["selected"]}, indent=2))
    print(f"wrote {args.out}/model.safetensors, config.json, report.json, training.png")
    return 0


STRATEGY_PARAMS = {  # CLI flag -> (strategy, parameter)
    "beta": ("c2t", "chain_c2t"), "top_k_tree": ("c2t", "eagle2"), "d_max": ("c2t",), "top_m": ("c2t", "chain_c2t"),
    "depth": ("eagle2",), "total_tokens": ("eagle2",), "length": ("chain",), "max_length": ("chain_c2t",),
}


def _strategy(name: str, classifier_path, overrides: dict):
    from .loading import load_classifier
    from .strategies import strategy_from_name

    params = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if name not in STRATEGY_PARAMS.get(key, ()):
            continue
        params["top_k" if key == "top_k_tree" else key] = value
    if name == "c2t" and "no_second_prune" in overrides and overrides["no_second_prune"]:
        params["second_prune"] = False
    clf = load_classifier(classifier_path) if name in ("c2t", "chain_c2t") else None
    return strategy_from_name(name, classifier=clf, **params)


def _add_strategy_flags(p):
    p.add_argument("--draft-full-vocab", action="store_true",
                   help="a head shipped with a restricted draft vocabulary drafts over all tokens instead")
    p.add_argument("--classifier", default=None, help="C2T classifier directory (default: the shipped one)")
    p.add_argument("--beta", type=float, default=None, help="C2T confidence threshold (default 0.5)")
    p.add_argument("--top-k-tree", type=int, default=None, help="K: children per node (c2t 15, eagle2 10)")
    p.add_argument("--d-max", type=int, default=None, help="C2T maximum depth (default 10)")
    p.add_argument("--top-m", type=int, default=None, help="C2T entropy top-M (default 1000)")
    p.add_argument("--no-second-prune", action="store_true", help="C2T without the top-K-by-confidence pruning")
    p.add_argument("--depth", type=int, default=None, help="EAGLE-2 depth (d_max - 1, default 5)")
    p.add_argument("--total-tokens", type=int, default=None, help="EAGLE-2 tree size incl. root (default 60)")
    p.add_argument("--length", type=int, default=None, help="chain length (default 5)")
    p.add_argument("--max-length", type=int, default=None, help="chain_c2t maximum length (default 10)")


def _overrides(args) -> dict:
    return {k: getattr(args, k, None) for k in (*STRATEGY_PARAMS, "no_second_prune")}


def _generate(args) -> int:
    import torch

    from .engine import SpeculativeGenerator
    from .loading import load_draft, load_target

    target, tok = load_target(args.target)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"][0]
    sample = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.strategy == "ar":
        import time

        t = time.perf_counter()
        with torch.no_grad():
            out = target.generate(ids[None], max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                  temperature=args.temperature or None, top_p=args.top_p, top_k=args.top_k or None)
        new = out[0, ids.numel():]
        dt = time.perf_counter() - t
        print(tok.decode(new, skip_special_tokens=True))
        print(json.dumps({"strategy": "ar", "new_tokens": new.numel(), "tokens_per_s": round(new.numel() / dt, 2)}))
        return 0
    draft = load_draft(args.draft, target, args.draft_full_vocab)
    gen = SpeculativeGenerator(target, draft, _strategy(args.strategy, args.classifier, _overrides(args)),
                               stop_token_ids=[tok.convert_tokens_to_ids("<|im_end|>")] if args.target == "smollm2" else ())
    from .engine import Metrics

    m, tokens = Metrics(), []
    for chunk in gen.stream(ids, args.max_new_tokens, metrics=m, **sample):
        tokens += chunk
        print(tok.decode(chunk, skip_special_tokens=True), end="", flush=True)
    print()
    if not args.no_baseline:
        m.baseline_time = gen.time_autoregressive(ids, len(tokens))
    s = m.summary()
    print(f"tau {s['tau']:.2f} | gamma {s['gamma']} ({s['gamma_per_step']}/step) | {s['tokens_per_s']} tokens/s"
          + (f" | speed-up {s['speedup']:.2f}x over plain decoding" if s["speedup"] else ""))
    return 0


def _read_prompts(path: str, limit: int | None):
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


def _sweeps(values: list[str]) -> list[dict]:
    """--sweep beta=0.3,0.5 --sweep total_tokens=20,40 -> per-strategy settings (each applies where valid)."""
    out = [{}]
    for spec in values or []:
        key, _, vals = spec.partition("=")
        key = key.replace("-", "_")
        if key not in STRATEGY_PARAMS or not vals:
            raise SystemExit(f"--sweep {spec!r}: expected NAME=v1,v2 with NAME in {sorted(STRATEGY_PARAMS)}")
        parsed = [float(v) if key == "beta" else int(v) for v in vals.split(",")]
        out = [{**o, key: v} for o in out for v in parsed]
    return out


BASELINES = ("ar", "prompt_lookup")  # bench rows that run the target's own generate()


def _hf_generate(target, ids, name: str, args, stop) -> tuple[int, float]:
    """(new tokens, seconds) of plain decoding ("ar") or transformers' prompt-lookup assisted decoding."""
    import time

    import torch

    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, eos_token_id=stop or None,
              pad_token_id=0, attention_mask=torch.ones_like(ids[None]))
    if args.temperature > 0:
        kw.update(temperature=args.temperature, top_p=1.0, top_k=None)
    if name == "prompt_lookup":
        kw["prompt_lookup_num_tokens"] = 10
    with torch.no_grad():
        t = time.perf_counter()
        out = target.generate(ids[None], **kw)
        return out.shape[1] - ids.numel(), time.perf_counter() - t


def _bench(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .engine import SpeculativeGenerator
    from .loading import load_draft, load_target

    target, tok = load_target(args.target)
    names = args.strategies.split(",")
    draft = load_draft(args.draft, target, args.draft_full_vocab) if any(n not in BASELINES for n in names) else None
    prompts = _read_prompts(args.prompts, args.limit)
    os.makedirs(args.out, exist_ok=True)
    stop = [tok.convert_tokens_to_ids("<|im_end|>")] if args.target == "smollm2" else []
    runs = []
    for name in names:
        seen = set()
        for sweep in _sweeps(args.sweep) if name not in BASELINES else [{}]:
            setting = {k: v for k, v in sweep.items() if name in STRATEGY_PARAMS[k]}
            if tuple(sorted(setting.items())) in seen:
                continue
            seen.add(tuple(sorted(setting.items())))
            runs.append((name, setting))
    rows = []
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for name, setting in tqdm(runs, desc="settings"):
            if name not in BASELINES:
                strategy = _strategy(name, args.classifier, {**_overrides(args), **setting})
                gen = SpeculativeGenerator(target, draft, strategy, stop_token_ids=stop)
            tot = {"steps": 0, "accepted": 0, "gamma": 0, "new_tokens": 0, "time": 0.0, "draft": 0.0, "verify": 0.0}
            for i, (qid, cat, text) in enumerate(tqdm(prompts, desc=f"{name} {setting}", leave=False)):
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"][0]
                if name in BASELINES:
                    if args.temperature > 0:
                        torch.manual_seed(args.seed + i)
                    n, dt = _hf_generate(target, ids, name, args, stop)
                    rec = {"strategy": name, "question_id": qid, "category": cat, "new_tokens": n,
                           "total_time_s": round(dt, 4), "tokens_per_s": round(n / dt, 2)}
                    tot["new_tokens"] += n
                    tot["time"] += dt
                else:
                    out = gen.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       seed=args.seed + i if args.temperature > 0 else None)
                    m = out.metrics
                    rec = {"strategy": name, **setting, "question_id": qid, "category": cat, **m.summary()}
                    for key, value in (("steps", m.steps), ("accepted", sum(m.accepted)), ("gamma", m.gamma),
                                       ("new_tokens", m.new_tokens), ("time", m.total_time), ("draft", m.draft_time),
                                       ("verify", m.verify_time)):
                        tot[key] += value
                f.write(json.dumps(rec) + "\n")
            steps = max(1, tot["steps"])
            rows.append({"strategy": name, "setting": setting,
                         "tau": tot["accepted"] / steps if tot["steps"] else None,
                         "accept_length": tot["new_tokens"] / steps if tot["steps"] else None,
                         "gamma_per_step": tot["gamma"] / steps if tot["steps"] else None,
                         "gamma": tot["gamma"], "new_tokens": tot["new_tokens"],
                         "tokens_per_s": tot["new_tokens"] / max(tot["time"], 1e-9),
                         "draft_time_s": tot["draft"], "verify_time_s": tot["verify"]})
    ar = next((r["tokens_per_s"] for r in rows if r["strategy"] == "ar"), None)
    for r in rows:
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar if ar else None
    meta = {"prompts": args.prompts, "questions": len(prompts), "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "draft": args.draft, "classifier": args.classifier,
            "threads": torch.get_num_threads()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    lines = ["| strategy | setting | tau | accept len | gamma/step | tokens/s | vs AR | draft s | verify s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['setting'] or ''} | {fmt(r['tau'], '.3f')} | {fmt(r['accept_length'], '.3f')}"
                     f" | {fmt(r['gamma_per_step'], '.1f')} | {r['tokens_per_s']:.2f} | {fmt(r['speedup_vs_ar'], '.2f')}"
                     f" | {r['draft_time_s']:.1f} | {r['verify_time_s']:.1f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    _plot_tau_gamma([r for r in rows if r["tau"] is not None], os.path.join(args.out, "tau_gamma.png"),
                    os.path.basename(args.prompts))
    return 0


def _plot_tau_gamma(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r["gamma_per_step"], r["tau"]) for r in rows if r["strategy"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set(xlabel="gamma (draft tokens verified per step)", ylabel="tau (accepted draft tokens per step)",
           title=f"tau-gamma: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _collect_trees(args) -> int:
    from tqdm.auto import tqdm

    from .classifier import TreeRecorder
    from .engine import SpeculativeGenerator
    from .loading import load_draft, load_target
    from .strategies import Eagle2

    target, tok = load_target(args.target)
    draft = load_draft(args.draft, target, args.draft_full_vocab)
    k, depth = args.top_k_tree or 10, args.depth if args.depth is not None else 10
    total = 1 + k + depth * k * k  # the complete expanded tree: no rerank
    if (args.prompts is None) == (args.sharegpt is None):
        raise ValueError("collect-trees needs exactly one of --prompts FILE and --sharegpt START")
    if args.prompts is not None:
        with open(args.prompts) as f:
            texts = [json.loads(line)["text"] if line.lstrip().startswith("{") else line.strip() for line in f
                     if line.strip()]
    else:
        from itertools import islice

        from .data import sharegpt_conversations

        firsts = (msgs[0]["content"] for msgs in islice(sharegpt_conversations(), args.sharegpt, None))
        texts = list(islice((t for t in firsts if len(t) <= 2000), args.limit or 100))  # long pastes: slow prefill
    texts = texts[: args.limit] if args.limit else texts
    with TreeRecorder(args.out, {"target": args.target, "draft": args.draft, "top_k": k, "depth": depth}) as rec:
        gen = SpeculativeGenerator(target, draft, Eagle2(top_k=k, depth=depth, total_tokens=total), recorder=rec)
        for text in tqdm(texts, desc="collect-trees"):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"][0]
            gen.generate(ids, max_new_tokens=args.max_new_tokens)
    print(f"wrote {rec.meta['rows']} rows from {rec.meta['trees']} trees ({rec.meta['positives']} accepted) to {args.out}")
    return 0


def _train_draft(args) -> int:
    from .data import sharegpt_conversations
    from .draft_training import DraftTrainConfig, cache_hidden_states, encode_conversations, train_draft
    from .loading import load_target

    target, tok = load_target(args.target)
    cache = args.cache or os.path.join(args.out, "feature_cache")
    convs = sharegpt_conversations(limit=args.conversations)
    meta = cache_hidden_states(target, encode_conversations(tok, convs, args.max_len), cache, args.token_budget)
    print(f"cached {meta['tokens']} tokens of {meta['sequences']} conversations in {cache}")
    cfg = DraftTrainConfig(epochs=args.epochs, lr=args.lr, accumulate=args.accumulate, save_every=args.save_every,
                           init_from_target=args.warm_start, weight_cls=args.weight_cls, loss_vocab=args.loss_vocab,
                           draft_vocab=not args.no_draft_vocab)
    report = train_draft(target, cache, args.out, cfg)
    last = report["history"][-1] if report["history"] else {}
    print(json.dumps({"steps": report["steps"], "tokens": report["tokens"], **last}, indent=2))
    print(f"wrote the draft head to {args.out} (use it with --draft {args.out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c2t-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-classifier", help="train the C2T classifier on a tree dataset")
    t.add_argument("--data", required=True, help="tree-dataset directory (TreeRecorder output)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--lr", type=float, default=None, help="default 1e-3, or 1e-4 when fine-tuning")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--min-steps", type=int, default=1500, help="raise the epochs until this many optimizer steps")
    t.add_argument("--neg-ratio", type=float, default=1.0, help="negatives per positive in each epoch")
    t.add_argument("--neg-sampling", default="depth_matched", choices=["depth_matched", "uniform"],
                   help="half of the negatives at the positives' depths (default), or all uniform")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--hidden", type=int, default=48)
    t.add_argument("--features", default="P,H,d", help="comma-separated subset of P,H,d")
    t.add_argument("--log-p", action="store_true", help="feed log P instead of P (extension)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--finetune-from", default=None, help="classifier directory to fine-tune")
    t.add_argument("--finetune-fraction", type=float, default=0.1)
    t.set_defaults(func=_train_classifier)

    g = sub.add_parser("generate", help="generate with speculative decoding and print tau, gamma, speed")
    g.add_argument("--prompt", required=True)
    g.add_argument("--strategy", default="c2t", choices=["c2t", "chain_c2t", "eagle2", "chain", "static", "ar"])
    g.add_argument("--target", default="smollm2", help="'smollm2' (shipped) or a local HF model directory")
    g.add_argument("--draft", default=None, help="draft head dir, HF model dir, or 'self' (default: shipped head)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sampling top-k of the target (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-baseline", action="store_true", help="skip timing plain decoding for the speed-up")
    _add_strategy_flags(g)
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="run strategies over an MT-bench style question file; tau-gamma table + plot")
    b.add_argument("--prompts", required=True, help="question.jsonl (first turn of each question)")
    b.add_argument("--strategies", default="c2t,eagle2",
                   help="comma-separated: c2t, chain_c2t, eagle2, chain, static, and the baselines ar (plain "
                        "decoding) and prompt_lookup (transformers' prompt-lookup assisted generation)")
    b.add_argument("--sweep", action="append", help="NAME=v1,v2 (beta, total_tokens, depth, ...); repeatable")
    b.add_argument("--target", default="smollm2")
    b.add_argument("--draft", default=None)
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--limit", type=int, default=None, help="first N questions only")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=0, help="sampling seed of the first question (then +1 each)")
    b.add_argument("--out", required=True)
    _add_strategy_flags(b)
    b.set_defaults(func=_bench)

    c = sub.add_parser("collect-trees", help="record full EAGLE-2 trees (P, H, d, accepted) for classifier training")
    c.add_argument("--prompts", default=None, help="text file (one prompt per line) or JSONL with a 'text' field")
    c.add_argument("--sharegpt", type=int, default=None, metavar="START",
                   help="instead of --prompts: first user turns of ShareGPT conversations START, START+1, ... "
                        "(--limit of them, default 100, up to 2000 characters each); pick a range the draft head "
                        "was not trained on")
    c.add_argument("--out", required=True)
    c.add_argument("--target", default="smollm2")
    c.add_argument("--draft", default=None)
    c.add_argument("--draft-full-vocab", action="store_true", help="draft over all tokens (see generate)")
    c.add_argument("--top-k-tree", type=int, default=None, help="default 10")
    c.add_argument("--depth", type=int, default=None, help="default 10 (d_max 11, 1011-node trees)")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--limit", type=int, default=None)
    c.set_defaults(func=_collect_trees)

    d = sub.add_parser("train-draft", help="train an EAGLE draft head for the target on ShareGPT conversations")
    d.add_argument("--out", required=True, help="output directory (the head, report.json, training.png)")
    d.add_argument("--target", default="smollm2")
    d.add_argument("--cache", default=None, help="feature cache directory (default: OUT/feature_cache)")
    d.add_argument("--conversations", type=int, default=None, help="use the first N ShareGPT conversations")
    d.add_argument("--token-budget", type=int, default=300_000, help="target tokens to cache (fp16 features)")
    d.add_argument("--max-len", type=int, default=512)
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--weight-cls", type=float, default=0.1, help="weight of the token CE (EAGLE-1: 0.1)")
    d.add_argument("--loss-vocab", type=int, default=8192, help="token ids in the training CE (0: all)")
    d.add_argument("--no-draft-vocab", action="store_true",
                   help="do not restrict the head's inference vocabulary to the loss vocabulary")
    d.add_argument("--accumulate", type=int, default=4)
    d.add_argument("--save-every", type=int, default=50)
    d.add_argument("--warm-start", action="store_true", help="start the layer from the target's last layer")
    d.set_defaults(func=_train_draft)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # bad input: say what was wrong, no traceback
        print(f"c2t-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
