"""`python -m bench.ceiling` (`seqserve bench ceiling`): what seqserve's own wire costs, with a model that
costs nothing.

The model is the benchmark LSTM shrunk to E=8, H=16, one layer, V=64, so that the engine's step is almost
all seqserve's own work. `seqserve serve` runs with its defaults; the load comes from other processes
(`--clients`, each a grpc.aio event loop with its share of the streams), closed-loop greedy streams of
`--tokens` tokens for `--duration` seconds per point. The `null` server of `bench.baselines` (no model,
one message per token) runs in the same rounds, and `--baseline-tree DIR` adds an older checkout's
`seqserve serve` (run from that tree's sources with this interpreter): targets alternate point by point.

Each point prints one JSON line: streams, tokens_per_s, messages_per_s, tokens_per_message,
server_cpu_cores (every process of the server together), CPU microseconds per token of each server
process and of its busiest threads, ITL p50/p99 (a chunk's gap spread over its tokens, as `bench.loadgen`
counts it), TTFT p50, errors by the server (calls still open when a point's time is up are cut by the load
itself: `cut_at_end`). `--repeats N` runs every point N times, alternating the targets' order.

    python -m bench.ceiling --streams 256,1024,4096 --baseline-tree /tmp/seqserve-88d1b8a
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import models
from bench.loadgen import CLK_TCK, LoadSpec, run_load, wait_ready
from bench.services import free_port, process_tree

ZERO_COST_LM = models.LMSpec("bench-tiny2", "lstm", embedding_size=8, hidden_size=16, num_layers=1, vocab_size=64)
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- the servers' processes and their CPU -------------------------------------------------------------------

def _ticks(stat_path: Path) -> int:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _role(pid: int) -> str:
    """A process's name in reports: its seqserve role when it has one (argv names it), else its command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [a.decode(errors="replace") for a in argv if a]
    for marker in ("--role", "--process-role"):
        if marker in words and words.index(marker) + 1 < len(words):
            return words[words.index(marker) + 1]
    if "serve" in words:
        return "serve"
    if "bench.baselines" in words:
        return "null"
    return Path(words[0]).name if words else str(pid)


def cpu_snapshot(root: int) -> dict[tuple[str, str], int]:
    """CPU ticks of every thread of `root` and its descendants, keyed (process role#pid, thread name#tid)."""
    ticks = {}
    for pid in [root, *process_tree(root)]:
        role = f"{_role(pid)}#{pid}"
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                name = (task / "comm").read_text().strip()
                ticks[role, f"{name}#{task.name}"] = _ticks(task / "stat")
            except OSError:
                continue
    return ticks


def cpu_report(before: dict, after: dict, seconds: float, tokens: int) -> dict:
    """Cores used by the whole server, and CPU µs per token per process and for its busiest threads."""
    spent = {key: after[key] - before.get(key, 0) for key in after}
    per_process: dict[str, float] = {}
    for (process, _), ticks in spent.items():
        per_process[process] = per_process.get(process, 0) + ticks
    total = sum(per_process.values()) / CLK_TCK
    us = lambda ticks: round(1e6 * ticks / CLK_TCK / tokens, 2) if tokens else None  # noqa: E731
    threads = sorted(((ticks, process, thread) for (process, thread), ticks in spent.items() if ticks), reverse=True)
    return {"server_cpu_cores": round(total / seconds, 3),
            "cpu_us_per_token": {process: us(ticks) for process, ticks in sorted(per_process.items())},
            "busiest_threads_us_per_token": {f"{process}/{thread}": us(ticks)
                                             for ticks, process, thread in threads[:8]}}


@dataclass
class Target:
    name: str
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_seqserve(name: str, tree: Path, repository: Path, logs: Path, env: dict[str, str]) -> Target:
    """`seqserve serve` from `tree`'s sources (this interpreter), with its defaults but polling off."""
    port = free_port()
    log = logs / f"{name}.log"
    environment = {**os.environ, "SEQSERVE_POLL_INTERVAL_SECONDS": "0", "SEQSERVE_LOG_LEVEL": "warning",
                   "SEQSERVE_METRICS_PORT": "-1", "PYTHONPATH": str(tree), **env}
    process = subprocess.Popen([sys.executable, "-m", "seqserve.cli", "serve", "--repository", str(repository),
                                "--port", str(port), "--log-format", "text"],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment, cwd=tree)
    return Target(name, process, port, log)


def start_null(repository: Path, logs: Path) -> Target:
    port = free_port()
    log = logs / "null.log"
    process = subprocess.Popen([sys.executable, "-m", "bench.baselines", "null", "--repository", str(repository),
                                "--name", ZERO_COST_LM.name, "--port", str(port)],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    return Target("null", process, port, log)


# --- the load, from other processes --------------------------------------------------------------------------

def client_main(args) -> int:
    """One load process: wait for "go" on stdin, drive its streams, write its samples, print a summary."""
    spec = LoadSpec(ZERO_COST_LM.name, args.streams, ("greedy",), ("",), args.tokens, requests=10**9,
                    duration=args.duration, channels=max(1, args.streams // 64), seed=args.seed)
    asyncio.run(wait_ready(args.target, ZERO_COST_LM.name))
    print("ready", flush=True)
    sys.stdin.readline()
    report = asyncio.run(run_load(args.target, spec))
    records = report.records
    gaps = np.array([g for r in records for g in r.gaps], dtype=np.float32)
    ttft = np.array([r.first - r.started for r in records if r.first is not None], dtype=np.float32)
    np.savez(args.samples, gaps=gaps, ttft=ttft)
    # A call still open when the time is up is cancelled by the load itself: that is the end of the
    # point, not an answer of the server's.
    errors = [r.error for r in records if r.error and not r.error.startswith("CANCELLED")]
    cut = sum(1 for r in records if r.error.startswith("CANCELLED"))
    print(json.dumps({"seconds": report.seconds, "tokens": sum(r.tokens for r in records),
                      "messages": sum(r.messages for r in records), "errors": len(errors), "cut_at_end": cut,
                      "first_error": errors[0] if errors else "", "client_cpu_seconds": report.client_cpu_seconds}),
          flush=True)
    return 0


def run_point(target: Target, streams: int, args, scratch: Path) -> dict:
    """`streams` streams split over `args.clients` load processes, against `target`; one JSON-able row."""
    clients = max(1, min(args.clients, streams))
    shares = [streams // clients + (i < streams % clients) for i in range(clients)]
    procs = []
    for index, share in enumerate(shares):
        samples = scratch / f"{target.name}-{streams}-{index}.npz"
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "bench.ceiling", "--client", "--target", target.address, "--client-streams",
             str(share), "--tokens", str(args.tokens), "--duration", str(args.duration), "--samples", str(samples),
             "--seed", str(index)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT), samples))
    for proc, _ in procs:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a load process did not start against {target.name}: {line!r}")
    before, started = cpu_snapshot(target.process.pid), time.perf_counter()
    for proc, _ in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc, _ in procs:
        out, _ = proc.communicate(timeout=args.duration + 300)
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - started
    after = cpu_snapshot(target.process.pid)
    seconds = max(r["seconds"] for r in results)
    tokens, messages = sum(r["tokens"] for r in results), sum(r["messages"] for r in results)
    gaps = np.concatenate([np.load(s)["gaps"] for _, s in procs])
    ttft = np.concatenate([np.load(s)["ttft"] for _, s in procs])
    pct = lambda a, q: round(float(np.percentile(a, q)) * 1e3, 3) if len(a) else None  # noqa: E731
    row = {"target": target.name, "streams": streams, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 1), "messages_per_s": round(messages / seconds, 1),
           "tokens_per_message": round(tokens / messages, 3) if messages else None,
           **cpu_report(before, after, wall, tokens),
           "client_cpu_cores": round(sum(r["client_cpu_seconds"] for r in results) / seconds, 3),
           "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99), "ttft_p50_ms": pct(ttft, 50),
           "errors": sum(r["errors"] for r in results), "cut_at_end": sum(r["cut_at_end"] for r in results),
           "first_error": next((r["first_error"] for r in results if r["first_error"]), "")}
    return row


# --- the run -----------------------------------------------------------------------------------------------------

def run(args) -> int:
    cache = Path(args.cache).expanduser().resolve()
    bundle = models.build_lm_bundle(cache, ZERO_COST_LM, lambda line: print(line, file=sys.stderr))
    repository = cache / "ceiling-models"  # the zero-cost model alone: a server loads nothing else
    if not (repository / ZERO_COST_LM.name).exists():
        repository.mkdir(parents=True, exist_ok=True)
        (repository / ZERO_COST_LM.name).symlink_to(bundle.repository / ZERO_COST_LM.name)
    env = dict(item.split("=", 1) for item in args.server_env)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        logs = Path(args.logs) if args.logs else scratch
        logs.mkdir(parents=True, exist_ok=True)
        targets = [start_seqserve("seqserve", REPO_ROOT, repository, logs,
                                  {**env, **dict(item.split("=", 1) for item in args.seqserve_env)})]
        if args.baseline_tree:
            targets.append(start_seqserve("baseline", Path(args.baseline_tree).resolve(), repository, logs, env))
        if not args.no_null:
            targets.append(start_null(repository, logs))
        try:
            for target in targets:
                asyncio.run(wait_ready(target.address, ZERO_COST_LM.name, timeout=300))
            for repeat in range(args.repeats):
                for streams in args.streams:
                    order = targets if (repeat + args.streams.index(streams)) % 2 == 0 else targets[::-1]
                    for target in order:
                        if target.process.poll() is not None:
                            raise RuntimeError(f"{target.name} exited; its log: {target.log}")
                        row = {**run_point(target, streams, args, scratch), "repeat": repeat}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            for target in targets:
                target.stop()
    summarize(rows, args)
    return 0


def summarize(rows: list[dict], args) -> None:
    """Medians over the repeats, and seqserve over the baseline tree pair by pair (to stderr)."""
    for streams in args.streams:
        line = [f"{streams:>5} streams:"]
        by = {}
        for target in ("seqserve", "baseline", "null"):
            points = [r for r in rows if r["target"] == target and r["streams"] == streams]
            if points:
                by[target] = {r["repeat"]: r["tokens_per_s"] for r in points}
                line.append(f"{target} {statistics.median(r['tokens_per_s'] for r in points):,.0f} tok/s "
                            f"(CPU {statistics.median(r['server_cpu_cores'] for r in points):.2f} cores)")
        if "baseline" in by:
            ratios = [by["seqserve"][r] / by["baseline"][r] for r in by["seqserve"] if by["baseline"].get(r)]
            line.append(f"seqserve/baseline {statistics.median(ratios):.2f}x")
        print("  ".join(line), file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqserve bench ceiling", description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--streams", type=ints, default=[256, 1024, 4096], help="concurrent streams per point")
    p.add_argument("--tokens", type=int, default=256, help="tokens each stream's requests generate")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per point")
    p.add_argument("--clients", type=int, default=2, help="load processes the streams are split over")
    p.add_argument("--repeats", type=int, default=1, help="runs of every point, targets alternating")
    p.add_argument("--baseline-tree", default="", help="an older checkout to run side by side")
    p.add_argument("--no-null", action="store_true", help="leave out the null server")
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for both seqserve servers")
    p.add_argument("--seqserve-env", action="append", default=[],
                   help="KEY=VALUE for this tree's server only (a setting the baseline does not know)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "seqserve" / "bench"), help="bundle cache")
    p.add_argument("--logs", default="", help="keep the servers' logs here")
    # one load process (internal)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--client-streams", type=int, dest="client_streams", help=argparse.SUPPRESS)
    p.add_argument("--samples", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.client:
        args.streams = args.client_streams
        return client_main(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
