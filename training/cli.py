"""`seqserve train lm|seq2seq` and `seqserve eval`."""

from __future__ import annotations

import argparse
import json

from training.config import load_config, parse_overrides


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="seqserve train", description="Train a language model or a seq2seq model.")
    parser.add_argument("kind", choices=["lm", "seq2seq"])
    parser.add_argument("--config", help="TOML file of overrides (configs/*.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, logs, TensorBoard)")
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.pt")
    parser.add_argument("--overfit-batch", action="store_true", help="train on one batch: loss must reach ~0")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's (auto)")
    args = parser.parse_args(argv)

    from training.loop import train

    sets = list(args.set)
    if args.overfit_batch:
        sets.append("overfit_batch=true")
    if args.device:
        sets.append(f"device={args.device}")
    if args.resume:
        # The run's saved config wins; only what is given on the command line changes.
        summary = train(None, args.out, resume=True, overrides=parse_overrides(sets))
    else:
        cfg = load_config(args.kind, args.config, sets)
        summary = train(cfg, args.out)
    print(json.dumps(summary, default=str))
    return 0


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="seqserve eval", description="Evaluate a training run or checkpoint.")
    parser.add_argument("run", help="run directory (uses best.pt) or a checkpoint file")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0, help="only the first N sources/documents")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from training.checkpoint import find_checkpoint, load_checkpoint
    from training.evaluate import evaluate_checkpoint

    payload = load_checkpoint(find_checkpoint(args.run))
    result = evaluate_checkpoint(payload, args.split, beam_size=args.beam_size,
                                 length_penalty=args.length_penalty, limit=args.limit, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0
