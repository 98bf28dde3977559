"""The ``c2t-fast`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _train_classifier(args) -> int:
    from .classifier import ClassifierConfig
    from .classifier_training import TrainConfig, train_classifier

    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, neg_ratio=args.neg_ratio,
                      val_fraction=args.val_fraction, seed=args.seed, finetune_from=args.finetune_from,
                      finetune_fraction=args.finetune_fraction,
                      model=ClassifierConfig(hidden=args.hidden, features=args.features.split(","), log_p=args.log_p))
    report = train_classifier(args.data, args.out, cfg)
    print(json.dumps({"selected_epoch": report["selected_epoch"], **report["selected"]}, indent=2))
    print(f"wrote {args.out}/model.safetensors, config.json, report.json, training.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c2t-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-classifier", help="train the C2T classifier on a tree dataset")
    t.add_argument("--data", required=True, help="tree-dataset directory (TreeRecorder output)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--lr", type=float, default=None, help="default 1e-3, or 1e-4 when fine-tuning")
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--neg-ratio", type=float, default=1.0, help="negatives per positive in each epoch")
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--hidden", type=int, default=48)
    t.add_argument("--features", default="P,H,d", help="comma-separated subset of P,H,d")
    t.add_argument("--log-p", action="store_true", help="feed log P instead of P (extension)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--finetune-from", default=None, help="classifier directory to fine-tune")
    t.add_argument("--finetune-fraction", type=float, default=0.1)
    t.set_defaults(func=_train_classifier)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
