"""Training throughput with 1, 2, ... torchrun ranks on this machine: the same config, the same global batch.

    python -m bench.train_ranks --config configs/g2p.toml --kind seq2seq --ranks 1 2 --steps 12

Each run is `seqserve train KIND --config C --nproc N --set max_steps=S`; tokens/s is the global batch's
target tokens over the wall time between step `--skip` and the last step, read from rank 0's
train_log.jsonl (start-up, data loading and the first steps are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(kind: str, config: str, ranks: int, steps: int, skip: int, sets: list[str], root: Path,
            threads: int | None = None) -> dict:
    out = root / f"ranks-{ranks}-threads-{threads or 'default'}"
    command = [sys.executable, "-m", "seqserve.cli", "train", kind, "--config", config, "--out", str(out),
               "--nproc", str(ranks), "--set", f"max_steps={steps}", "--set", "progress=false",
               "--set", "eval_decode=0", *(arg for s in sets for arg in ("--set", s))]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None  # torchrun keeps a set value
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens" in r]
    timed = records[skip:]
    seconds = timed[-1]["seconds"] - records[skip - 1]["seconds"] if skip else timed[-1]["seconds"]
    tokens = sum(r["tokens"] for r in timed)
    return {"ranks": ranks, "threads_per_rank": threads or "default", "steps_timed": len(timed), "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "seconds_per_step": round(seconds / len(timed), 3),
            "wall_seconds_with_startup": round(wall, 1), "loadavg_1min_before": round(load_before, 2),
            "command": " ".join(command[2:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_ranks", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/g2p.toml")
    parser.add_argument("--kind", default="seq2seq", choices=["lm", "seq2seq"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12, help="updates per run")
    parser.add_argument("--skip", type=int, default=2, help="first updates left out of the timing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every rank (default: torchrun's, which "
                        "is 1 per rank when there are several, torch's own for one)")
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not 0 <= args.skip < args.steps:
        parser.error(f"--skip must be in [0, --steps), got {args.skip}")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        for ranks in args.ranks:
            print(json.dumps(measure(args.kind, args.config, ranks, args.steps, args.skip, args.set, root,
                                     args.threads)),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
