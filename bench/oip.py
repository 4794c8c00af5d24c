"""The Open Inference Protocol under NVIDIA's perf_analyzer beside the same load on the native API.

    python -m bench.oip [--perf-analyzer bench/.perf_analyzer/perf_analyzer] [--concurrency 1,2,4]

Starts `seqserve serve` on the repository's models and, per concurrency, drives two loads twice: once with
our own grpc.aio client on seqserve.v1, once with perf_analyzer (when given; `bench/perf_analyzer_setup.sh`
fetches it) on inference.GRPCInferenceService:
- g2p: closed-loop translations of "hello" (Translate / ModelInfer, `--string-data hello`);
- lm-sequences: sequences of 3 requests on fortunes-lm, each feeding "The " and generating 16 tokens
  (CreateSession/Feed + GenerateInSession + CloseSession / ModelStreamInfer with `--sequence-length 3
  --streaming`). Latency is to the first streamed response, as perf_analyzer measures a decoupled model.
Prints one markdown table (requests/s and latency percentiles in ms) per load.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.loadgen import REPO_ROOT, start_seqserve, wait_ready
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

SEQUENCE_TEXT, SEQUENCE_LENGTH, SEQUENCE_TOKENS = "The ", 3, 16


async def _closed_loop(target: str, concurrency: int, seconds: float, one) -> dict:
    """`concurrency` workers each calling `one(stub, latencies)` until `seconds` pass; requests/s, percentiles."""
    latencies: list[float] = []
    counts = {"requests": 0, "responses": 0}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SeqserveStub(channel)
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                await one(stub, latencies, counts)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"requests_per_s": counts["requests"] / elapsed, "responses_per_s": counts["responses"] / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99))}


async def _translate(stub, latencies, counts) -> None:
    started = time.perf_counter()
    await stub.Translate(pb.TranslateRequest(model="g2p-en", sources=["hello"]))
    latencies.append(time.perf_counter() - started)
    counts["requests"] += 1
    counts["responses"] += 1


async def _sequence(stub, latencies, counts) -> None:
    options = pb.DecodingOptions(max_new_tokens=SEQUENCE_TOKENS)
    session_id = ""
    for step in range(SEQUENCE_LENGTH):
        started = time.perf_counter()
        if step == 0:
            session_id = (await stub.CreateSession(pb.CreateSessionRequest(model="fortunes-lm",
                                                                           prefix=SEQUENCE_TEXT))).session_id
        else:
            await stub.Feed(pb.FeedRequest(session_id=session_id, text=SEQUENCE_TEXT))
        first = True
        async for _ in stub.GenerateInSession(pb.GenerateInSessionRequest(session_id=session_id, options=options)):
            if first:
                latencies.append(time.perf_counter() - started)
                first = False
            counts["responses"] += 1
        counts["requests"] += 1
    await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


def _perf_analyzer(binary: str, target: str, concurrency: int, seconds: float, load: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.csv"
        command = [binary, "-i", "grpc", "-u", target, "--concurrency-range", f"{concurrency}:{concurrency}",
                   "--measurement-interval", str(int(seconds * 1000)),
                   "--stability-percentage", "100",  # on a shared CPU, 50% often never settles
                   "-f", str(report)]
        if load == "g2p":
            command += ["-m", "g2p-en", "--string-data", "hello"]
        else:
            command += ["-m", "fortunes-lm", "--string-data", SEQUENCE_TEXT, "--streaming", "--sequence-length",
                        str(SEQUENCE_LENGTH), "--request-parameter", f"max_new_tokens:{SEQUENCE_TOKENS}:int"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not report.exists():
            return {"error": (result.stdout + result.stderr).strip().splitlines()[-1:]}
        row = next(csv.DictReader(report.open()))
        out = {"requests_per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
               "p90_ms": float(row["p90 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000}
        if row.get("Response Throughput"):
            out["responses_per_s"] = float(row["Response Throughput"])
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", default=str(REPO_ROOT / "models"))
    parser.add_argument("--perf-analyzer", default="", help="perf_analyzer (wrapper) path; empty = native only")
    parser.add_argument("--concurrency", default="1,2,4", help="comma-separated concurrency levels")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--loads", default="g2p,lm-sequences")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as logs:
        server = start_seqserve(Path(args.repository), Path(logs))
        try:
            asyncio.run(wait_ready(server.target, "fortunes-lm"))
            for load in args.loads.split(","):
                print(f"\n### {load}\n\n| concurrency | client | requests/s | responses/s | p50 ms | p90 ms | p99 ms |")
                print("|---|---|---|---|---|---|---|")
                one = _translate if load == "g2p" else _sequence
                for concurrency in levels:
                    rows = [("seqserve.v1 (bench.oip)",
                             asyncio.run(_closed_loop(server.target, concurrency, args.seconds, one)))]
                    if args.perf_analyzer:
                        rows.append(("perf_analyzer (OIP)", _perf_analyzer(args.perf_analyzer, server.target,
                                                                           concurrency, args.seconds, load)))
                    for name, row in rows:
                        if "error" in row:
                            print(f"| {concurrency} | {name} | failed: {row['error']} | | | | |")
                            continue
                        print(f"| {concurrency} | {name} | {row['requests_per_s']:.1f} | "
                              f"{row.get('responses_per_s', float('nan')):.1f} | {row['p50_ms']:.1f} | "
                              f"{row['p90_ms']:.1f} | {row['p99_ms']:.1f} |", flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
