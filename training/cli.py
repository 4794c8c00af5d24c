"""`seqserve train lm|seq2seq` and `seqserve eval`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

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
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="run N processes on this machine under torchrun (data parallel, one per GPU or "
                             "N CPU processes); the same as `torchrun --standalone --nproc_per_node=N -m "
                             "seqserve.cli train ...`")
    args = parser.parse_args(argv)
    if args.nproc is not None:
        return launch_torchrun(args.nproc, argv)

    from training.distributed import CollectiveFailed
    from training.loop import train

    sets = list(args.set)
    if args.overfit_batch:
        sets.append("overfit_batch=true")
    if args.device:
        sets.append(f"device={args.device}")
    try:
        if args.resume:
            # The run's saved config wins; only what is given on the command line changes.
            summary = train(None, args.out, resume=True, overrides=parse_overrides(sets))
        else:
            cfg = load_config(args.kind, args.config, sets)
            summary = train(cfg, args.out)
    except CollectiveFailed as error:
        print(f"seqserve train: {error}. The run stops; continue it from {args.out}/last.pt with --resume.",
              file=sys.stderr, flush=True)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, default=str))
    return 0


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N -m seqserve.cli train ARGS` (ARGS without --nproc), spelled
    `python -m torch.distributed.run` so it needs no torchrun on PATH."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "seqserve.cli", "train", *rest]


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        print("seqserve train: --nproc starts torchrun; this process already runs under torchrun",
              file=sys.stderr)
        return 2
    try:
        command = torchrun_command(nproc, argv)
    except ValueError as error:
        print(f"seqserve train: {error}", file=sys.stderr)
        return 2
    print("seqserve train: " + " ".join(shlex.quote(part) for part in command), file=sys.stderr, flush=True)
    return subprocess.call(command)


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
