"""Priorities through a real `seqserve serve` process over gRPC: high-priority requests take rows from
running low-priority streams at once, and the streams they park lose nothing.

The model is the repository's `fortunes-lm` (a character LSTM, 2 x 512), served with
`max_rows_per_step=64` (`--rows`) and the prefix cache off (so every prompt token is computed once and the prefill
counter is exact). `--lows` (256) greedy streams of priority 0, each `--low-tokens` long (400: they outlive
the high-priority traffic by far), fill the 64 rows and the queue; once the running ones stream, `--highs`
(20) greedy Generates of priority 10 (32 tokens each) arrive, one every `--high-gap-ms` (50 ms). The same
low streams run alone on a second server (`priority_aging_seconds = 0`, so nothing is ever parked there).
A third server is the TTFT reference: the same 20 requests at priority 0 join 44 low streams, with rows
free for them, so nothing is parked: what joining a running batch costs without any preemption.

Checks: the high-priority requests' TTFT p50 <= 3 decode steps, a decode step being the median interval
between consecutive tokens of the low streams while the high-priority requests run (the whole step as a
stream sees it); every low stream's final text equals its text alone; the prefill counter
(`seqserve_prefill_tokens_total`) equals the prompt tokens (`seqserve_prompt_tokens_total`): nothing was
computed twice, whatever was parked (`seqserve_preemptions_total`).

    python -m bench.priorities [--rows 64] [--lows 256] [--low-tokens 400] [--highs 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.loadgen import REPO_ROOT, start_seqserve, wait_ready
from bench.prefix import counters, fortunes
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

MODEL = "fortunes-lm"
HIGH_PRIORITY = 10
HIGH_TOKENS = 32
COUNTERS = ("seqserve_prompt_tokens_total", "seqserve_prefill_tokens_total", "seqserve_preemptions_total",
            "seqserve_decode_step_duration_seconds_sum", "seqserve_decode_step_duration_seconds_count")


@dataclass
class Stream:
    text: str = ""
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens)
    started: float = 0.0
    ttft: float | None = None
    done: bool = False


async def stream(stub, prompt: str, tokens: int, priority: int, record: Stream) -> None:
    options = pb.DecodingOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    record.started = time.perf_counter()
    async for response in stub.Generate(pb.GenerateRequest(model=MODEL, prompt=prompt, options=options,
                                                           priority=priority)):
        now = time.perf_counter()
        if response.HasField("chunk"):
            if record.ttft is None:
                record.ttft = now - record.started
            record.chunks.append((now, len(response.chunk.token_ids)))
        else:
            record.text = response.done.text
            record.done = True


async def run(args, lows: list[str], highs: list[str], log, *, high_priority: int = HIGH_PRIORITY) -> dict:
    """The low streams, and the high ones (if any) once the running low streams are under way."""
    env = {"SEQSERVE_MAX_ROWS_PER_STEP": str(args.rows), "SEQSERVE_PREFIX_CACHE_BYTES": "0",
           "SEQSERVE_MAX_QUEUE": str(args.lows + args.highs + 16),
           "SEQSERVE_MAX_BEAM_SIZE": str(min(16, args.rows)), "SEQSERVE_DEFAULT_BEAM_SIZE": str(min(4, args.rows))}
    if not highs:
        env["SEQSERVE_PRIORITY_AGING_SECONDS"] = "0"
    with tempfile.TemporaryDirectory() as logs:
        server = start_seqserve(REPO_ROOT / "models", Path(logs), env=env)
        try:
            await wait_ready(server.target, MODEL)
            before = counters(server.metrics_port, COUNTERS)
            channels = [grpc.aio.insecure_channel(server.target) for _ in range(4)]
            stubs = [pb_grpc.SeqserveStub(channel) for channel in channels]
            low_records = [Stream() for _ in lows]
            started = time.perf_counter()
            tasks = [asyncio.create_task(stream(stubs[i % 4], prompt, args.low_tokens, 0, record))
                     for i, (prompt, record) in enumerate(zip(lows, low_records, strict=True))]
            high_records, window = [], (0.0, 0.0)
            if highs:
                # Until the rows are taken and streaming: the running low streams have 20 tokens each.
                while sum(1 for r in low_records if sum(n for _, n in r.chunks) >= 20) < min(args.rows, len(lows)):
                    await asyncio.sleep(0.01)
                high_records = [Stream() for _ in highs]
                high_tasks = []
                first = time.perf_counter()
                for i, (prompt, record) in enumerate(zip(highs, high_records, strict=True)):
                    high_tasks.append(asyncio.create_task(stream(stubs[i % 4], prompt, HIGH_TOKENS, high_priority,
                                                                 record)))
                    await asyncio.sleep(args.high_gap_ms / 1000)
                await asyncio.gather(*high_tasks)
                window = (first, time.perf_counter())
                log(f"  the {len(highs)} requests of priority {high_priority} done in {window[1] - window[0]:.2f} s")
            await asyncio.gather(*tasks)
            seconds = time.perf_counter() - started
            after = counters(server.metrics_port, COUNTERS)
            await asyncio.gather(*(channel.close() for channel in channels))
        finally:
            server.stop()
    delta = {name: after[name] - before[name] for name in COUNTERS}
    gaps = []
    for record in low_records:  # per token: a chunk of k tokens after a gap g gives k gaps of g / k
        for (previous, _), (now, count) in zip(record.chunks, record.chunks[1:], strict=False):
            if window[0] <= now <= window[1] and count:
                gaps += [(now - previous) / count] * count
    return {"lows": [r.text for r in low_records], "highs": high_records, "seconds": seconds, "gaps": gaps,
            "counters": delta, "low_tokens": sum(n for r in low_records for _, n in r.chunks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqserve bench priorities", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="max_rows_per_step (default 64)")
    parser.add_argument("--lows", type=int, default=256)
    parser.add_argument("--low-tokens", type=int, default=400)
    parser.add_argument("--highs", type=int, default=20)
    parser.add_argument("--high-gap-ms", type=float, default=50.0)
    parser.add_argument("--json", help="write the figures and checks here")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rng = random.Random(1)
    texts = fortunes(60)
    lows = [text[:40] for text in rng.sample(texts, args.lows)]
    highs = [text[:40] for text in rng.sample(texts, args.highs)]
    log("contended: low streams, then high-priority requests")
    contended = asyncio.run(run(args, lows, highs, log))
    log("alone: the same low streams, no high-priority traffic")
    alone = asyncio.run(run(args, lows, [], log))
    log(f"reference: the same requests at priority 0 join {args.rows - len(highs)} low streams, rows free for them")
    reference = asyncio.run(run(args, lows[: args.rows - len(highs)], highs, log, high_priority=0))

    step = statistics.median(contended["gaps"])
    ttft = sorted(r.ttft for r in contended["highs"])
    joined = [r.ttft for r in reference["highs"]]
    c = contended["counters"]
    steps = max(c["seqserve_decode_step_duration_seconds_count"], 1)
    server_step = c["seqserve_decode_step_duration_seconds_sum"] / steps
    same = [a == b for a, b in zip(contended["lows"], alone["lows"], strict=True)]
    figures = {
        "high_ttft_p50_ms": 1000 * statistics.median(ttft), "high_ttft_max_ms": 1000 * ttft[-1],
        "decode_step_ms": 1000 * step, "server_decode_call_ms": 1000 * server_step,
        "high_ttft_p50_steps": statistics.median(ttft) / step,
        "free_row_ttft_p50_ms": 1000 * statistics.median(joined),
        "free_row_ttft_p50_steps": statistics.median(joined) / statistics.median(reference["gaps"]),
        "reference_preemptions": int(reference["counters"]["seqserve_preemptions_total"]),
        "preemptions": int(c["seqserve_preemptions_total"]),
        "preemptions_alone": int(alone["counters"]["seqserve_preemptions_total"]),
        "prompt_tokens": int(c["seqserve_prompt_tokens_total"]),
        "prefill_tokens": int(c["seqserve_prefill_tokens_total"]),
        "low_streams_identical": f"{sum(same)}/{len(same)}",
        "low_tokens_per_s_contended": contended["low_tokens"] / contended["seconds"],
        "low_tokens_per_s_alone": alone["low_tokens"] / alone["seconds"],
    }
    checks = {
        "ttft_p50_within_3_steps": figures["high_ttft_p50_steps"] <= 3,
        "low_texts_identical": all(same) and all(contended["lows"]),
        "nothing_recomputed": figures["prefill_tokens"] == figures["prompt_tokens"],
        "rows_were_parked": figures["preemptions"] > 0,
    }
    for name, value in figures.items():
        print(f"- {name}: {value:.2f}" if isinstance(value, float) else f"- {name}: {value}")
    for name, ok in checks.items():
        print(f"- check {name}: {'ok' if ok else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "checks": checks}, indent=1) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
