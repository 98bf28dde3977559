"""The ``c2t-fast`` command line: argument parsing; the work is done by the library (``bench``,
``decoding``, ``training``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train_classifier(args) -> int:
    from .decoding.classifier import ClassifierConfig
    from .training.classifier import TrainConfig, train_classifier

    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, min_steps=args.min_steps,
                      neg_ratio=args.neg_ratio, neg_sampling=args.neg_sampling,
                      val_fraction=args.val_fraction, seed=args.seed, finetune_from=args.finetune_from,
                      finetune_fraction=args.finetune_fraction, select_by=args.select_by,
                      model=ClassifierConfig(hidden=args.hidden, features=args.features.split(","), log_p=args.log_p))
    report = train_classifier(args.data, args.out, cfg)
    print(json.dumps({"selected_epoch": report["selected_epoch"], **report["selected"]}, indent=2))
    print(f"wrote {args.out}/model.safetensors, config.json, report.json, training.png")
    return 0


# Strategy flags -> strategy parameters. The sampling flag --top-k is the target's, so the tree's K is
# --top-k-tree; every other flag is the parameter's own name. Help texts read the defaults from the
# strategy classes (decoding.strategies.strategy_parameters), never restate them.
_TREE_FLAGS = {"beta": "C2T confidence threshold", "top_k": "K: children kept per node",
               "d_max": "C2T maximum depth", "top_m": "entropy over the top-M logits",
               "depth": "EAGLE-2 depth (d_max - 1)", "total_tokens": "EAGLE-2 tree size after rerank, root included",
               "length": "chain length", "max_length": "chain_c2t maximum length"}


def _flag_dest(param: str) -> str:
    from .decoding.defaults import flag_name

    return flag_name(param)


def _defaults(param: str) -> str:
    from .decoding.strategies import STRATEGIES, strategy_parameters

    return ", ".join(f"{n} {strategy_parameters(n)[param]}" for n in STRATEGIES if param in strategy_parameters(n))


def _add_ngram_flag(p, many: bool):
    from .decoding import defaults

    if many:
        p.add_argument("--ngram", default=str(defaults.NGRAM_TOKENS),
                       help="comma-separated n-gram branch lengths to run each strategy with (prompt lookup in the "
                            "prompt and the reply; 0: none), e.g. 0,10 for the ablation (default: %(default)s, "
                            "as generate)")
    else:
        p.add_argument("--ngram", type=int, default=defaults.NGRAM_TOKENS,
                       help="graft n-gram lookup continuations (prompt and reply) of up to this many tokens onto "
                            "each tree, sized by the cost rule like every other node (default %(default)s; 0: none)")


def _add_budget_flag(p, many: bool):
    from .decoding import defaults

    if many:
        p.add_argument("--budget", default=defaults.BUDGET,
                       help="comma-separated tree sizing to run each strategy with: none (the tree as grown) or auto "
                            "(cut by this machine's measured verification cost, plain steps when no tree pays), "
                            "e.g. none,auto for the ablation (default: %(default)s, as generate)")
    else:
        p.add_argument("--budget", choices=("none", "auto"), default=defaults.BUDGET,
                       help="auto (default): size each tree by this machine's measured verification cost "
                            "(measured once, cached) and run plain steps when no tree pays; none: verify each "
                            "tree as the strategy grows it")


def _add_source_flags(p, many: bool):
    from .decoding import defaults

    if many:
        p.add_argument("--datastore", default=defaults.DEFAULT,
                       help="comma-separated datastores to run each strategy with: default (the shipped one for the "
                            "shipped target, none for another), shipped, none or a directory, e.g. none,default for "
                            "the ablation (default: %(default)s, as generate)")
        p.add_argument("--recycling", default=defaults.DEFAULT,
                       help="comma-separated default/0/1: Token Recycling's branches as generate has them (on for the "
                            "shipped target), off or on (default: %(default)s)")
    else:
        p.add_argument("--datastore", default=defaults.DEFAULT,
                       help="graft the continuations found in a datastore of the target's own text: shipped (the "
                            "shipped target's replies), a directory (c2t-fast build-datastore) or none; default: "
                            "shipped for the shipped target, none for another")
        p.add_argument("--recycling", action=argparse.BooleanOptionalAction, default=defaults.DEFAULT,
                       help="graft Token Recycling's branches (the target's own top-k at every verified node); "
                            "default: on for the shipped target, off for another")


def _recycling_list(text: str) -> tuple:
    """``--recycling`` of bench: comma-separated default / 0 / 1."""
    from .decoding import defaults

    out = []
    for v in text.split(","):
        if v not in (defaults.DEFAULT, "0", "1"):
            raise ValueError(f"--recycling {text!r}: expected comma-separated default, 0 or 1")
        out.append(v if v == defaults.DEFAULT else int(v))
    return tuple(out)


def _add_config_flags(p, defaults, fields, choices: dict | None = None):
    """A flag per dataclass field, typed and defaulted by the dataclass (``--reply-tokens`` for reply_tokens;
    a field defaulting to None takes an int)."""
    for f in fields:
        v = getattr(defaults, f)
        p.add_argument("--" + f.replace("_", "-"), type=int if v is None else type(v), default=v,
                       **({"choices": (choices or {})[f]} if f in (choices or {}) else {}))


def _add_device_flag(p):
    p.add_argument("--device", default="auto", help="where the target and draft run: auto (the GPU when there is "
                                                     "one), cpu, cuda, cuda:1, ...")
    p.add_argument("--stock-linear", action="store_true",
                   help="run the target's and draft's linear layers with torch's F.linear (MKL) instead of "
                        "c2t_fast's skinny kernel (the default for an fp32 model on the CPU)")


def _add_strategy_flags(p):
    p.add_argument("--draft-full-vocab", action="store_true",
                   help="a head shipped with a restricted draft vocabulary drafts over all tokens instead")
    p.add_argument("--classifier", default=None, help="C2T classifier directory (default: the shipped one)")
    for param, what in _TREE_FLAGS.items():
        flag = "--" + _flag_dest(param).replace("_", "-")
        kind = float if param == "beta" else int
        p.add_argument(flag, dest=_flag_dest(param), type=kind, default=None,
                       help=f"{what} (default: {_defaults(param)})")
    p.add_argument("--no-second-prune", action="store_true", help="C2T without the top-K-by-confidence pruning")


def _strategy_params(args) -> dict:
    params = {k: getattr(args, _flag_dest(k), None) for k in _TREE_FLAGS}
    if getattr(args, "no_second_prune", False):
        params["second_prune"] = False
    return params


def _generate(args) -> int:
    from .decoding.main_job import MainJob, run_main_job

    run_main_job(MainJob(
        prompt=args.prompt, target=args.target, device=args.device, stock_linear=args.stock_linear, draft=args.draft,
        draft_full_vocab=args.draft_full_vocab, strategy=args.strategy, classifier=args.classifier,
        params=_strategy_params(args), ngram=args.ngram, budget=args.budget, datastore=args.datastore,
        recycling=args.recycling, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, baseline=not args.no_baseline,
        processors={f: getattr(args, f) for f in _PROCESSOR_FLAGS if getattr(args, f) is not None}))
    return 0


# transformers' generation settings applied as logits processors along the tree (decoding.processors)
_PROCESSOR_FLAGS = {"repetition_penalty": (float, "penalise tokens already in the text (transformers' meaning)"),
                    "no_repeat_ngram_size": (int, "never repeat an n-gram of this size"),
                    "min_new_tokens": (int, "no end of turn before this many new tokens"),
                    "min_p": (float, "sampling: drop tokens below min_p x the top token's probability"),
                    "typical_p": (float, "sampling: locally typical sampling mass")}


def _int_list(flag: str, text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None
    if any(v < 0 for v in values):
        raise ValueError(f"{flag} {text!r}: lengths must be >= 0")
    return values


def _bench(args) -> int:
    from .bench import BenchConfig, format_table, parse_sweeps, run_bench

    cfg = BenchConfig(prompts=args.prompts, out=args.out, strategies=tuple(args.strategies.split(",")),
                      sweeps=parse_sweeps(args.sweep), params=_strategy_params(args), target=args.target,
                      draft=args.draft, draft_full_vocab=args.draft_full_vocab, classifier=args.classifier,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, temperature=args.temperature,
                      seed=args.seed, device=args.device, ngram=_int_list("--ngram", args.ngram),
                      budget=tuple(args.budget.split(",")), stock_linear=args.stock_linear,
                      datastore=tuple(args.datastore.split(",")), recycling=_recycling_list(args.recycling))
    print(format_table(run_bench(cfg)["rows"]))
    return 0


def _collect_trees(args) -> int:
    from .decoding.drafts.loading import load_draft
    from .hf.loading import load_target
    from .training.tree_dataset import collect_trees

    if (args.prompts is None) == (args.sharegpt is None):
        raise ValueError("collect-trees needs exactly one of --prompts FILE and --sharegpt START")
    if args.prompts is not None:
        with open(args.prompts) as f:
            texts = [json.loads(line)["text"] if line.lstrip().startswith("{") else line.strip() for line in f
                     if line.strip()]
        texts = texts[: args.limit] if args.limit else texts
    else:
        from .training.sharegpt import first_turns

        texts = first_turns(args.sharegpt, args.limit or 100)
    target, tok = load_target(args.target, device=args.device, fast_linear=False if args.stock_linear else None)
    draft = load_draft(args.draft, target, args.draft_full_vocab)
    meta = collect_trees(target, tok, draft, texts, args.out, top_k=args.top_k_tree or 10,
                         depth=args.depth if args.depth is not None else 10, max_new_tokens=args.max_new_tokens,
                         metadata={"target": args.target, "draft": args.draft})
    print(f"wrote {meta['rows']} rows from {meta['trees']} trees ({meta['positives']} accepted) to {args.out}")
    return 0


def _head_dir(spec: str | None) -> str | None:
    """A head directory, 'default' naming the shipped head."""
    if spec != "default":
        return spec
    from .decoding.drafts.loading import DEFAULT_DRAFT_DIR

    return DEFAULT_DRAFT_DIR


def _train_draft(args) -> int:
    from .hf.adapter import vocab_size
    from .hf.loading import load_target
    from .training.draft_head import DraftTrainConfig, train_draft_on_text

    if args.init and args.head != "eagle1":
        raise ValueError("train-draft: --init fine-tunes an EAGLE-1 head (--head eagle1)")
    target, tok = load_target(args.target)
    if args.head == "eagle3":
        from .training.eagle3_head import Eagle3TrainConfig

        cfg = Eagle3TrainConfig(epochs=args.epochs, lr=args.lr, accumulate=args.accumulate, save_every=args.save_every,
                                steps=args.ttt_steps, draft_vocab=args.loss_vocab or vocab_size(target),
                                val_fraction=args.held_out, eval_every=args.eval_every,
                                probe_init=not args.no_probe_init)
    else:
        cfg = DraftTrainConfig(epochs=args.epochs, lr=args.lr, accumulate=args.accumulate, save_every=args.save_every,
                               init_from_target=args.warm_start, weight_cls=args.weight_cls, loss_vocab=args.loss_vocab,
                               draft_vocab=not args.no_draft_vocab, val_fraction=args.held_out,
                               init_from=_head_dir(args.init))
    report = train_draft_on_text(target, tok, args.out, cfg, distilled=tuple(args.distilled or ()),
                                 conversations=args.conversations, max_len=args.max_len, cache_dir=args.cache,
                                 token_budget=args.token_budget)
    meta = report["cache"]
    print(f"cached {meta['tokens']} tokens of {meta['sequences']} sequences in {meta['dir']}")
    last = report["history"][-1] if report["history"] else {}
    print(json.dumps({"steps": report["steps"], "tokens": report["tokens"], **last}, indent=2))
    print(f"wrote the draft head to {args.out} (use it with --draft {args.out})")
    return 0


def _distill_data(args) -> int:
    from .hf.loading import load_target
    from .training.distill import DistillConfig, distill

    cfg = DistillConfig(start=args.start, conversations=args.conversations, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, sample_every=args.sample_every,
                        temperature=args.temperature, max_prompt_chars=args.max_prompt_chars, seed=args.seed,
                        length_sort_batches=args.length_sort_batches)
    target, tok = load_target(args.target, device=args.device, fast_linear=False if args.stock_linear else None)
    meta = distill(target, tok, args.out, cfg)
    print(f"{meta['sequences']} sequences, {meta['tokens']} reply tokens at {meta.get('tokens_per_s', 0)} tokens/s "
          f"in {args.out} (train on them: c2t-fast train-draft --distilled {args.out} --out DIR)")
    return 0


def _generate_data(args) -> int:
    from .hf.loading import load_target
    from .training.generator import GeneratorConfig
    from .training.selfdistill import generate_data

    cfg = GeneratorConfig(**{f: getattr(args, f) for f in _GENERATOR_FLAGS})
    target, tok = load_target(args.target, fast_linear=False)
    meta = generate_data(target, tok, args.out, cfg, reply_tokens=args.reply_tokens, features_dir=args.features_dir,
                         feature_budget_gb=args.feature_budget_gb, capture=not args.no_features,
                         time_limit_s=args.time_limit)
    s = meta["sessions"][-1]
    print(f"{meta['jobs']} jobs, {meta['reply_tokens']} training + {meta['heldout_reply_tokens']} held-out reply tokens "
          f"in {args.out}; this run: {s['reply_tokens_per_s']} reply tokens/s on {s['cpu']}")
    return 0


def _train_head(args) -> int:
    from .hf.loading import load_target
    from .training.selfdistill_train import SelfDistillTrainConfig, train_selfdistilled

    cfg = SelfDistillTrainConfig(**{f: getattr(args, f) for f in _HEAD_FLAGS})
    target, _ = load_target(args.target, fast_linear=False)
    report = train_selfdistilled(target, args.data, args.out, cfg, features_dir=args.features_dir)
    print(json.dumps({"heldout": report["heldout"], "train_reply_tokens": report["data"]["train_reply_tokens"],
                      "draft_vocab_coverage_heldout": report["draft_vocab_coverage_heldout"]}, indent=2))
    print(f"wrote the EAGLE-3 head to {args.out} (use it with --draft {args.out})")
    return 0


def _build_datastore(args) -> int:
    from .training.datastore_build import build_datastore

    meta = build_datastore(args.out, tuple(args.data or ()), tuple(args.distilled or ()), args.max_tokens)
    print(f"wrote a datastore of {meta['tokens']} tokens ({meta['documents']} replies, {meta['bytes'] / 1e6:.1f} MB) "
          f"to {args.out}")
    return 0


def _export_head(args) -> int:
    from .decoding.drafts.export import export_head
    from .decoding.drafts.loading import load_draft
    from .hf.adapter import text_config
    from .hf.loading import load_target

    target, _ = load_target(args.target, fast_linear=False)
    head = load_draft(None if args.draft == "default" else args.draft, target)
    tc = text_config(target)
    verifier = args.verifier or ("HuggingFaceTB/SmolLM2-135M-Instruct" if args.target == "smollm2" else args.target)
    files = export_head(head, args.out, args.format, tc.num_hidden_layers, args.dtype, args.speculative_tokens,
                        verifier, tuple(getattr(target.config, "architectures", None) or ("LlamaForCausalLM",)))
    print(f"wrote {', '.join(files)} to {args.out} ({args.format} layout; read back with --draft {args.out})")
    return 0


_HEAD_FLAGS = ("reply_tokens", "epochs", "lr", "accumulate", "steps", "draft_vocab", "loss", "layers", "seed",
               "save_every", "precision")

_GENERATOR_FLAGS = ("slots", "capacity", "max_new_tokens", "max_turn_tokens", "sample_share", "kv_dtype",
                    "magpie_prompts", "magpie_every", "seed", "shard_jobs")


def build_parser() -> argparse.ArgumentParser:
    from .decoding import defaults
    from .decoding.strategies import STRATEGIES

    p = argparse.ArgumentParser(prog="c2t-fast", description="Lossless speculative decoding with classifier-pruned "
                                "token trees (C2T): generate, benchmark, and train the draft head and classifier.")
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
    t.add_argument("--select-by", choices=("average_precision", "recall"), default="average_precision",
                   help="checkpoint selection: validation average precision (default; the ranking over every "
                        "threshold), or recall at beta 0.5, then the fewest kept nodes (the paper's rule)")
    t.set_defaults(func=_train_classifier)

    g = sub.add_parser("generate", help="generate with speculative decoding and print tau, gamma, speed",
                       description=f"Defaults (shared with bench, c2t_fast.generate and SpeculativeGenerator): "
                                   f"{defaults.describe()}, the shipped draft head.")
    g.add_argument("--prompt", required=True)
    g.add_argument("--strategy", default=defaults.STRATEGY, choices=[*STRATEGIES, "ar"],
                   help="a tree strategy, or ar: the target's own generate() (plain decoding); default %(default)s")
    g.add_argument("--target", default="smollm2", help="'smollm2' (shipped) or a local HF model directory")
    g.add_argument("--draft", default=None, help="draft head dir, HF model dir, 'self', or 'none' (the training-free "
                                                 "sources alone; default: the shipped head)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sampling top-k of the target (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-baseline", action="store_true", help="skip timing plain decoding for the speed-up")
    for f, (kind, what) in _PROCESSOR_FLAGS.items():
        g.add_argument("--" + f.replace("_", "-"), type=kind, default=None, help=what + " (default: off)")
    _add_strategy_flags(g)
    _add_ngram_flag(g, many=False)
    _add_budget_flag(g, many=False)
    _add_source_flags(g, many=False)
    _add_device_flag(g)
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="run strategies over an MT-bench style question file; tau-gamma table + plot",
                       description=f"A strategy's row with no flags runs what `c2t-fast generate` runs ({defaults.describe()}, "
                                   "the shipped draft head); the summary marks that row (default).")
    b.add_argument("--prompts", required=True, help="question.jsonl (first turn of each question)")
    b.add_argument("--strategies", default="c2t,eagle2",
                   help=f"comma-separated: {', '.join(STRATEGIES)}, and the baselines ar (plain decoding) and "
                        "prompt_lookup (transformers' prompt-lookup assisted generation)")
    b.add_argument("--sweep", action="append",
                   help="NAME=v1,v2 with NAME any numeric strategy parameter (beta, top_k, d_max, depth, total_tokens, "
                        "length, ...; each applies to the strategies that take it); repeatable")
    b.add_argument("--target", default="smollm2")
    b.add_argument("--draft", default=None)
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--limit", type=int, default=None, help="first N questions only")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=0, help="sampling seed of the first question (then +1 each)")
    b.add_argument("--out", required=True)
    _add_strategy_flags(b)
    _add_ngram_flag(b, many=True)
    _add_budget_flag(b, many=True)
    _add_source_flags(b, many=True)
    _add_device_flag(b)
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
    _add_device_flag(c)
    c.set_defaults(func=_collect_trees)

    d = sub.add_parser("train-draft", help="train an EAGLE draft head for the target on ShareGPT conversations "
                                           "or on its own replies (--distilled)")
    d.add_argument("--out", required=True, help="output directory (the head, report.json, training.png)")
    d.add_argument("--head", choices=("eagle1", "eagle3"), default="eagle1",
                   help="eagle1: fc over [token; last hidden state], feature regression + token CE; eagle3: fc over "
                        "three target layers, own LM head over the draft vocabulary, training-time test")
    d.add_argument("--target", default="smollm2")
    d.add_argument("--cache", default=None, help="feature cache directory (default: OUT/feature_cache)")
    d.add_argument("--conversations", type=int, default=None, help="use the first N ShareGPT conversations")
    d.add_argument("--token-budget", type=int, default=300_000, help="target tokens to cache (fp16 features)")
    d.add_argument("--max-len", type=int, default=512)
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--weight-cls", type=float, default=0.1, help="weight of the token CE (EAGLE-1: 0.1)")
    d.add_argument("--loss-vocab", type=int, default=8192, help="token ids in the training CE and the head's draft "
                                                               "vocabulary (0: all)")
    d.add_argument("--ttt-steps", type=int, default=3, help="eagle3: training-time test unroll (steps weighted 0.8^i)")
    d.add_argument("--no-probe-init", action="store_true", help="eagle3: start fc as the projection onto the highest "
                                                                 "feature instead of a least-squares probe")
    d.add_argument("--eval-every", type=int, default=0, help="eagle3: optimizer steps between held-out acceptance "
                                                             "figures (the acceptance vs training tokens curve)")
    d.add_argument("--held-out", type=float, default=0.05, help="share of the cached sequences held out for the "
                                                               "validation figures")
    d.add_argument("--no-draft-vocab", action="store_true",
                   help="do not restrict the head's inference vocabulary to the loss vocabulary")
    d.add_argument("--accumulate", type=int, default=4)
    d.add_argument("--save-every", type=int, default=50)
    d.add_argument("--warm-start", action="store_true", help="start the layer from the target's last layer")
    d.add_argument("--init", default=None, metavar="DIR",
                   help="eagle1: fine-tune this saved head ('default': the shipped one) instead of starting fresh")
    d.add_argument("--distilled", action="append", default=None, metavar="DIR",
                   help="train on the target's own replies from `c2t-fast distill-data` instead of ShareGPT text "
                        "(repeatable: runs in that order; only the last may still grow after caching started)")
    d.set_defaults(func=_train_draft)

    x = sub.add_parser("distill-data", help="the target's own replies to ShareGPT first turns, as token ids "
                                            "(self-distilled draft training data; resumable)")
    x.add_argument("--out", required=True)
    x.add_argument("--target", default="smollm2")
    x.add_argument("--start", type=int, default=3000, help="first ShareGPT conversation (default 3000: clear of the "
                                                           "shipped head's 0-2,200 and classifier's 7,000+)")
    x.add_argument("--conversations", type=int, default=1000)
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--max-new-tokens", type=int, default=256)
    x.add_argument("--sample-every", type=int, default=4, help="every n-th batch sampled, the rest greedy (0: all "
                                                              "greedy)")
    x.add_argument("--temperature", type=float, default=0.8)
    x.add_argument("--max-prompt-chars", type=int, default=2000, help="skip longer first turns (a long paste makes "
                                                                     "a slow prefill for the whole batch)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--length-sort-batches", type=int, default=8,
                   help="answer the prompts in groups of this many batches sorted by token length, so each batch "
                        "pads to similar prompts (0: ShareGPT order, as the run in experiments/results/"
                        "distill_smollm2 was made)")
    _add_device_flag(x)
    x.set_defaults(func=_distill_data)

    from .training.generator import GeneratorConfig

    g = sub.add_parser("generate-data", help="grow a self-distilled data set at the machine's speed: the target's "
                                              "replies to every ShareGPT human turn (and Magpie prompts), token ids "
                                              "committed in shards, draft features on local disk; resumable")
    g.add_argument("--out", required=True)
    g.add_argument("--target", default="smollm2")
    g.add_argument("--reply-tokens", type=int, default=5_000_000, help="stop once the data set holds this many "
                                                                       "training reply tokens")
    g.add_argument("--time-limit", type=float, default=None, help="seconds after which this run stops")
    g.add_argument("--features-dir", default=None, help="local directory of the draft features (default: under "
                                                        "the c2t_fast cache)")
    g.add_argument("--feature-budget-gb", type=float, default=25.0)
    g.add_argument("--no-features", action="store_true", help="token ids only")
    _add_config_flags(g, GeneratorConfig(), _GENERATOR_FLAGS)
    g.set_defaults(func=_generate_data)

    from .training.selfdistill_train import SelfDistillTrainConfig

    h = sub.add_parser("train-head", help="train an EAGLE-3 head on a `c2t-fast generate-data` data set: fused "
                                          "three-layer features, training-time test, draft vocabulary by frequency in "
                                          "the target's replies, soft labels from its top-k; held-out acceptance")
    h.add_argument("--data", required=True, help="the data set directory")
    h.add_argument("--out", required=True)
    h.add_argument("--target", default="smollm2")
    h.add_argument("--features-dir", default=None, help="where the data set's features are (recomputed when missing)")
    _add_config_flags(h, SelfDistillTrainConfig(), _HEAD_FLAGS, {"loss": ("soft", "hard"), "layers": (1, 2),
                                                                 "precision": ("auto", "fp32", "bf16")})
    h.set_defaults(func=_train_head)

    ds = sub.add_parser("build-datastore", help="a datastore of the target's own replies (training-free draft "
                                                 "branches: --datastore DIR in generate / bench)")
    ds.add_argument("--out", required=True)
    ds.add_argument("--data", action="append", help="a `c2t-fast generate-data` data set (repeatable)")
    ds.add_argument("--distilled", action="append", help="a `c2t-fast distill-data` run (repeatable)")
    ds.add_argument("--max-tokens", type=int, default=8_000_000, help="at most this many tokens (2 bytes each)")
    ds.set_defaults(func=_build_datastore)

    e = sub.add_parser("export-head", help="write a trained EAGLE-3 head in the layout SGLang (sglang) or vLLM's "
                                           "speculators format (speculators) loads")
    e.add_argument("--draft", required=True, help="the head directory (`c2t-fast train-head --out`)")
    e.add_argument("--format", required=True, choices=("sglang", "speculators"))
    e.add_argument("--out", required=True, help="a new or empty directory")
    e.add_argument("--target", default="smollm2")
    e.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    e.add_argument("--speculative-tokens", type=int, default=3, help="speculators: the greedy proposal's length")
    e.add_argument("--verifier", default=None, help="speculators: the target's hub id or path (default: "
                                                    "HuggingFaceTB/SmolLM2-135M-Instruct for the shipped target)")
    e.set_defaults(func=_export_head)
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
