"""Soak: N mixed streams (greedy, sampling, beam, sessions) against `seqserve serve` for T seconds, in rounds.

Each round runs every stream in a closed loop until the round's time is up; a stream finishes the request
it is in (nothing is cancelled, so every call has one outcome on both sides). After each round it reports
errors by status code, TTFT and inter-token percentiles, the server's RSS, and whether the server's
`seqserve_requests_total` moved by exactly what the clients counted, RPC by RPC and code by code.

    python -m bench.soak --streams 1000 --seconds 60 --rounds 3 --out /tmp/soak

Without `--repository` it serves the default repository (`models/`: fortunes-lm and g2p-en).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from bench.loadgen import (
    REPO_ROOT,
    LoadSpec,
    RequestRecord,
    _consume,
    _ms,
    _options,
    make_channels,
    start_seqserve,
    wait_ready,
)
from bench.services import process_tree
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

KINDS = ("greedy", "sampling", "beam", "sessions")
PROMPTS = ("the", "a man", "you will", "never", "it is", "love", "all")


class Tally:
    """Client-side count of finished calls by (rpc, code)."""

    def __init__(self):
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    async def call(self, rpc: str, coroutine):
        try:
            result = await coroutine
        except grpc.aio.AioRpcError as error:
            self.counts[rpc, error.code().name] += 1
            raise
        self.counts[rpc, "OK"] += 1
        return result

    async def stream(self, rpc: str, call, record: RequestRecord) -> None:
        try:
            await _consume(call, record)
        except grpc.aio.AioRpcError as error:
            self.counts[rpc, error.code().name] += 1
            raise
        self.counts[rpc, "OK"] += 1


async def one_request(stub, kind: str, index: int, spec: LoadSpec, tally: Tally, record: RequestRecord) -> None:
    prompt = PROMPTS[index % len(PROMPTS)]
    options = _options(kind, spec.output_tokens, spec, index)
    if kind != "sessions":
        await tally.stream("Generate", stub.Generate(pb.GenerateRequest(model=spec.model, prompt=prompt,
                                                                        options=options)), record)
        return
    session = await tally.call("CreateSession", stub.CreateSession(pb.CreateSessionRequest(model=spec.model,
                                                                                         prefix=prompt)))
    try:
        await tally.call("Feed", stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" and")))
        record.started = time.perf_counter()
        options.strategy = pb.DecodingOptions.STRATEGY_GREEDY
        await tally.stream("GenerateInSession", stub.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=session.session_id, options=options)), record)
    finally:
        await tally.call("CloseSession", stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id)))


async def run_round(target: str, spec: LoadSpec, seconds: float, counter) -> tuple[list[RequestRecord], Tally, float]:
    channels = make_channels(target, spec.channels)
    stubs = [pb_grpc.SeqserveStub(c) for c in channels]
    tally, records = Tally(), []
    end = time.perf_counter() + seconds

    async def stream(worker: int) -> None:
        stub = stubs[worker % len(stubs)]
        while time.perf_counter() < end:
            index = next(counter)
            record = RequestRecord(kind=KINDS[index % len(KINDS)], started=time.perf_counter())
            records.append(record)
            try:
                await one_request(stub, record.kind, index, spec, tally, record)
            except grpc.aio.AioRpcError as error:
                record.error = error.code().name

    started = time.perf_counter()
    try:
        await asyncio.gather(*(stream(w) for w in range(spec.concurrency)))
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
    return records, tally, time.perf_counter() - started


def server_counts(metrics_port: int) -> collections.Counter:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for labels, value in re.findall(r"^seqserve_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts[fields["rpc"], fields["code"]] += int(float(value))
    return counts


def rss_mib(pid: int) -> float:
    """Resident memory of the server: the process and every process it started (an engine process and API
    processes when it runs several)."""
    total = 0
    for member in (pid, *process_tree(pid)):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:  # ended meanwhile
            continue
        total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
    return total / 1024


async def settled_counts(metrics_port: int, expected: collections.Counter, before: collections.Counter,
                         timeout: float = 10.0) -> collections.Counter:
    """The server's counts moved since `before`, once they reach `expected` or `timeout` passed: a call is
    counted as it ends on the server, a moment after its client had the last answer."""
    give_up = time.monotonic() + timeout
    while True:
        moved = server_counts(metrics_port) - before
        if moved == expected or time.monotonic() > give_up:
            return moved
        await asyncio.sleep(0.05)


def summary(records: list[RequestRecord], seconds: float) -> dict:
    errors = collections.Counter(r.error for r in records if r.error)
    ttft = [r.first - r.started for r in records if r.first is not None]
    gaps = [g for r in records if r.kind != "beam" for g in r.gaps]
    return {"requests": len(records), "errors": dict(errors), "seconds": round(seconds, 1),
            "tokens_per_s": round(sum(r.tokens for r in records) / seconds, 1),
            "ttft_p50_ms": round(_ms(ttft, 50), 1), "ttft_p99_ms": round(_ms(ttft, 99), 1),
            "itl_p50_ms": round(_ms(gaps, 50), 2), "itl_p99_ms": round(_ms(gaps, 99), 2)}


async def soak(args) -> dict:
    logs = Path(args.out)
    logs.mkdir(parents=True, exist_ok=True)
    repository = Path(args.repository) if args.repository else REPO_ROOT / "models"
    server = start_seqserve(repository, logs, {"SEQSERVE_MAX_QUEUE": str(max(1024, 2 * args.streams))})
    try:
        await wait_ready(server.target, args.model)
        spec = LoadSpec(model=args.model, concurrency=args.streams, output_tokens=args.tokens, channels=args.channels)
        counter = itertools.count()
        rounds = []
        for number in range(1, args.rounds + 1):
            before = server_counts(server.metrics_port)
            records, tally, seconds = await run_round(server.target, spec, args.seconds, counter)
            moved = await settled_counts(server.metrics_port, tally.counts, before)
            row = {"round": number, **summary(records, seconds), "rss_mib": round(rss_mib(server.process.pid), 1),
                   "metrics_agree": moved == tally.counts,
                   "client_counts": {f"{rpc}/{code}": n for (rpc, code), n in sorted(tally.counts.items())}}
            if moved != tally.counts:
                row["server_counts"] = {f"{rpc}/{code}": n for (rpc, code), n in sorted(moved.items())}
            print(json.dumps(row), flush=True)
            rounds.append(row)
        growth = (rounds[-1]["rss_mib"] / rounds[-2]["rss_mib"] - 1) if len(rounds) >= 2 else float("nan")
        result = {"streams": args.streams, "seconds": args.seconds, "rounds": rounds,
                  "rss_growth_last_round": round(growth, 4),
                  "errors": sum(sum(r["errors"].values()) for r in rounds),
                  "metrics_agree": all(r["metrics_agree"] for r in rounds)}
        (logs / "soak.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--channels", type=int, default=8, help="HTTP/2 connections the streams share")
    parser.add_argument("--model", default="fortunes-lm")
    parser.add_argument("--repository", help="model repository (default: models/)")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="soak-"))
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args))
    print(f"errors {result['errors']}, RSS growth in the last round {result['rss_growth_last_round']:+.1%}, "
          f"metrics agree: {result['metrics_agree']}")
    return 0 if result["errors"] == 0 and result["metrics_agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
