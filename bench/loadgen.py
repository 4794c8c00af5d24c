"""A grpc.aio load generator for the `Generate` RPC on loopback, bounded in requests and in time.

`concurrency` closed-loop streams each send one request after another until the request budget is
spent or the time limit passes (streams still open then are cancelled and their tokens so far count).
Every chunk's arrival is timed on the client: TTFT is request start to first chunk; inter-token
latency (ITL) spreads each later chunk's gap over the tokens it carries (a chunk of 3 tokens after
30 ms gives three 10 ms samples), so coalesced chunks are neither hidden nor counted as free.
The same generator drives seqserve and every baseline, which all implement the same RPC.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.services import free_port, process_tree
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

MIXES = ("greedy", "sampling", "beam", "sessions")
SUMMARY_COLUMNS = ("concurrency", "requests", "completed", "errors", "seconds", "tokens", "tokens_per_s",
                   "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                   "tokens_per_message", "client_cpu")
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO_ROOT = Path(__file__).resolve().parents[1]  # servers run from here, as `python -m ...`


@dataclass(frozen=True)
class LoadSpec:
    """One point of a sweep."""

    model: str
    concurrency: int
    mix: tuple[str, ...] = ("greedy",)  # strategies, cycled over the requests
    prompts: tuple[str, ...] = ("",)  # cycled over the requests
    output_tokens: int = 64  # max_new_tokens = min_new_tokens: every request generates exactly this many
    output_jitter: float = 0.0  # > 0: output length drawn uniformly in output_tokens * [1 - j, 1 + j]
    requests: int = 0  # request budget; 0 = 2 per stream
    duration: float = 20.0  # seconds before open streams are cancelled
    beam_size: int = 4
    channels: int = 4  # HTTP/2 connections the streams are spread over
    seed: int = 0


@dataclass
class RequestRecord:
    kind: str
    started: float
    first: float | None = None
    ended: float | None = None
    tokens: int = 0
    messages: int = 0
    gaps: list[float] = field(default_factory=list)  # per-token ITL samples (seconds)
    error: str = ""


@dataclass
class LoadReport:
    spec: LoadSpec
    seconds: float
    records: list[RequestRecord]
    client_cpu_seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """One row: throughput, latency percentiles, and how many tokens rode in each message."""
        done = [r for r in self.records if r.ended is not None and not r.error]
        tokens = sum(r.tokens for r in self.records)
        messages = sum(r.messages for r in self.records)
        ttft = [r.first - r.started for r in self.records if r.first is not None]
        gaps = [g for r in self.records if r.kind != "beam" for g in r.gaps]
        return {
            "concurrency": self.spec.concurrency, "requests": len(self.records), "completed": len(done),
            "errors": sum(1 for r in self.records if r.error), "seconds": round(self.seconds, 3),
            "tokens": tokens, "tokens_per_s": tokens / self.seconds if self.seconds else 0.0,
            "requests_per_s": len(done) / self.seconds if self.seconds else 0.0,
            "ttft_p50_ms": _ms(ttft, 50), "ttft_p99_ms": _ms(ttft, 99),
            "itl_p50_ms": _ms(gaps, 50), "itl_p99_ms": _ms(gaps, 99),
            "tokens_per_message": tokens / messages if messages else float("nan"),
            "client_cpu": self.client_cpu_seconds / self.seconds if self.seconds else 0.0,
        }

    def first_error(self) -> str:
        return next((r.error for r in self.records if r.error), "")


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000.0) if len(values) else float("nan")


def make_channels(target: str, count: int) -> list[grpc.aio.Channel]:
    # A distinct channel argument per channel keeps grpc from sharing one connection between them.
    return [grpc.aio.insecure_channel(target, options=[("bench.channel", i), ("grpc.max_receive_message_length",
                                                                               64 * 1024 * 1024)])
            for i in range(max(1, count))]


def _options(kind: str, tokens: int, spec: LoadSpec, seed: int) -> pb.DecodingOptions:
    options = pb.DecodingOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    if kind == "sampling":
        options.strategy = pb.DecodingOptions.STRATEGY_SAMPLE
        options.temperature, options.top_k, options.seed = 1.0, 50, seed
    elif kind == "beam":
        options.strategy = pb.DecodingOptions.STRATEGY_BEAM
        options.beam_size = spec.beam_size
    else:
        options.strategy = pb.DecodingOptions.STRATEGY_GREEDY
    return options


async def _consume(call, record: RequestRecord) -> None:
    previous = None
    async for response in call:
        if not response.HasField("chunk"):
            continue
        now = time.perf_counter()
        count = len(response.chunk.token_ids)
        record.messages += 1
        record.tokens += count
        if previous is None:
            record.first = now
        elif count:
            record.gaps.extend([(now - previous) / count] * count)
        previous = now
    record.ended = time.perf_counter()


async def _one(stub, kind: str, prompt: str, tokens: int, spec: LoadSpec, seed: int, record: RequestRecord) -> None:
    options = _options(kind, tokens, spec, seed)
    if kind != "sessions":
        await _consume(stub.Generate(pb.GenerateRequest(model=spec.model, prompt=prompt, options=options)), record)
        return
    session = await stub.CreateSession(pb.CreateSessionRequest(model=spec.model, prefix=prompt))
    try:
        record.started = time.perf_counter()  # TTFT of the generation, not of the session's creation
        options.strategy = pb.DecodingOptions.STRATEGY_GREEDY
        await _consume(stub.GenerateInSession(pb.GenerateInSessionRequest(session_id=session.session_id,
                                                                          options=options)), record)
    finally:
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))


async def sessions_supported(stub, model: str) -> str:
    """'' if the server serves sessions, else why not (sessions are skipped with this note)."""
    try:
        session = await stub.CreateSession(pb.CreateSessionRequest(model=model), timeout=30)
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=30)
        return ""
    except grpc.aio.AioRpcError as error:
        return f"sessions skipped: CreateSession answered {error.code().name}: {error.details()}"


async def run_load(target: str, spec: LoadSpec) -> LoadReport:
    """Drive `spec` against the server at `target` (host:port) and time every chunk."""
    channels = make_channels(target, min(spec.channels, spec.concurrency))
    stubs = [pb_grpc.SeqserveStub(c) for c in channels]
    notes, mix = [], list(spec.mix)
    try:
        if "sessions" in mix:
            why = await sessions_supported(stubs[0], spec.model)
            if why:
                notes.append(why)
                mix = [m for m in mix if m != "sessions"] or ["greedy"]
        budget = spec.requests or 2 * spec.concurrency
        counter = itertools.count()
        rng = random.Random(spec.seed)
        records: list[RequestRecord] = []
        deadline = time.perf_counter() + spec.duration

        async def stream(worker: int) -> None:
            stub = stubs[worker % len(stubs)]
            while time.perf_counter() < deadline:
                index = next(counter)
                if index >= budget:
                    return
                kind = mix[index % len(mix)]
                tokens = spec.output_tokens
                if spec.output_jitter > 0:
                    low = max(1, round(tokens * (1 - spec.output_jitter)))
                    tokens = rng.randint(low, round(tokens * (1 + spec.output_jitter)))
                record = RequestRecord(kind=kind, started=time.perf_counter())
                records.append(record)
                try:
                    await _one(stub, kind, spec.prompts[index % len(spec.prompts)], tokens, spec,
                               spec.seed * 1_000_003 + index, record)
                except grpc.aio.AioRpcError as error:
                    record.error = f"{error.code().name}: {error.details()}"
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        await asyncio.sleep(0.05)

        cpu0, started = time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(stream(w)) for w in range(spec.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        seconds = time.perf_counter() - started
        if pending:
            notes.append(f"time limit {spec.duration:.0f}s: {len(pending)} streams cancelled mid-request")
        return LoadReport(spec, seconds, records, time.process_time() - cpu0, notes)
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


async def wait_ready(target: str, model: str, timeout: float = 120.0) -> None:
    """Until one tiny Generate succeeds (the server is up and the model loaded).

    A fresh channel per try: a channel that found nobody listening backs off its reconnects (up to
    minutes), which would outlast a server that is merely slow to start on a busy machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.SeqserveStub(channel)
            try:
                call = stub.Generate(pb.GenerateRequest(model=model, options=pb.DecodingOptions(max_new_tokens=1)),
                                     timeout=10)
                async for _ in call:
                    pass
                return
            except grpc.aio.AioRpcError as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target} not ready for {model}: {error.code().name} "
                                       f"{error.details()}") from error
        await asyncio.sleep(0.2)


def word_prompts(words: Sequence[str], tokens: int, count: int = 64, seed: int = 0) -> tuple[str, ...]:
    """`count` prompts of `tokens` words drawn from `words` (for word-level benchmark models)."""
    rng = random.Random(seed)
    return tuple(" ".join(rng.choice(words) for _ in range(tokens)) for _ in range(count))


def corpus_prompts(path: str, tokens: int, count: int = 64, seed: int = 0, unit: str = "word") -> tuple[str, ...]:
    """Prompts from a text file: the first `tokens` words (or characters, unit='char') of random lines."""
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    rng = random.Random(seed)
    picks = [rng.choice(lines) for _ in range(count)]
    if unit == "char":
        return tuple(line[:tokens] for line in picks)
    return tuple(" ".join(line.split()[:tokens]) for line in picks)


# --- the servers under test, each in its own process -------------------------------------------------

@dataclass
class ServerProcess:
    """A server in a child process: its gRPC target, /metrics port (seqserve) and CPU seconds so far."""

    name: str
    process: subprocess.Popen
    port: int
    metrics_port: int | None = None
    log: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU seconds of the whole server: the process and those it started (engine and API processes),
        every thread."""
        return sum(_stat_cpu(Path(f"/proc/{pid}/stat")) for pid in self._pids())

    def main_thread_cpu_seconds(self) -> float:
        """CPU seconds of the main threads: the asyncio loops, where grpc.aio and the servicer run (one per
        API process, and the engine process's)."""
        return sum(_stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat")) for pid in self._pids())

    def _pids(self) -> list[int]:
        return [self.process.pid, *process_tree(self.process.pid)]

    def metrics(self, model: str) -> dict[str, float]:
        """The engine histograms' sums and counts for `model` (seqserve only)."""
        if self.metrics_port is None:
            return {}
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        wanted = ("seqserve_batch_size", "seqserve_decode_step_duration_seconds", "seqserve_queue_wait_seconds",
                  "seqserve_time_to_first_token_seconds")
        values = {}
        for name in wanted:
            for suffix in ("_sum", "_count"):
                match = re.search(rf'^{name}{suffix}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.M)
                values[name + suffix] = float(match.group(1)) if match else 0.0
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _stat_cpu(path: Path) -> float:
    try:
        fields_ = path.read_text().rsplit(")", 1)[1].split()
    except OSError:  # a process that ended meanwhile
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK  # utime + stime


def start_seqserve(repository: Path, logs: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """`seqserve serve` on free ports, no repository polling; `env` adds SEQSERVE_* settings."""
    port, metrics_port = free_port(), free_port()
    log = logs / "seqserve.log"
    environment = {**os.environ, "SEQSERVE_POLL_INTERVAL_SECONDS": "0", "SEQSERVE_LOG_LEVEL": "warning",
                   **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "seqserve.cli", "serve", "--repository", str(repository), "--port", str(port),
         "--metrics-port", str(metrics_port), "--log-format", "text"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment, cwd=REPO_ROOT)
    return ServerProcess("seqserve", process, port, metrics_port, log)


def start_baseline(kind: str, bundle, logs: Path, threads: int = 0) -> ServerProcess:
    """A `bench.baselines` server for `bundle` (a `bench.models.BenchBundle`); `threads` for torch."""
    port = free_port()
    log = logs / f"{kind}-{bundle.name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.baselines", kind, "--repository", str(bundle.repository), "--name",
         bundle.name, "--checkpoint", str(bundle.checkpoint), "--port", str(port), "--threads", str(threads)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    return ServerProcess(kind, process, port, None, log)


