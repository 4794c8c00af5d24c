"""What one huge request does to everyone else: a stream decodes while K prompts of ~4 MB arrive at once.

Reports how long each huge request took to be refused, the longest gap between the running stream's
chunks while they were in flight (against its median gap before), how long health checks took meanwhile,
and the server's RSS before and after.

    python -m bench.big_input --huge 8 --out /tmp/big
    python -m bench.big_input --server-root /path/to/an/older/checkout   # the same load on other code
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import loadgen
from bench.loadgen import REPO_ROOT, wait_ready
from bench.soak import rss_mib
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

ENDLESS_TOKENS = 1_000_000  # the running stream is ended by the benchmark
HUGE = "the cat sat on the mat. " * 170_000  # 4.08 million characters, under the 4 MiB message limit


def send_huge(target: str, model: str, count: int) -> list[tuple[float, str]]:
    """`count` huge Generate calls at once, from threads of this (separate) process: (seconds, code) each."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])
    request = pb.GenerateRequest(model=model, prompt=HUGE).SerializeToString()
    call = channel.unary_stream("/seqserve.v1.Seqserve/Generate", request_serializer=None)
    channel_ready = grpc.channel_ready_future(channel)
    channel_ready.result(timeout=30)

    def one(_) -> tuple[float, str]:
        started = time.perf_counter()
        try:
            list(call(request, timeout=120))
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        return time.perf_counter() - started, code

    with concurrent.futures.ThreadPoolExecutor(max(1, count)) as threads:
        results = list(threads.map(one, range(count)))
    channel.close()
    return results


async def measure(target: str, model: str, huge: int) -> dict:
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as channel, \
            grpc.aio.insecure_channel(target, options=options + [("bench.second", 1)]) as other:
        stub, health = pb_grpc.SeqserveStub(channel), health_pb2_grpc.HealthStub(other)
        stream = stub.Generate(pb.GenerateRequest(model=model, prompt="the", options=pb.DecodingOptions(
            max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)))
        arrivals: list[float] = []

        async def read() -> None:
            async for response in stream:
                if response.HasField("chunk"):
                    arrivals.append(time.perf_counter())

        reader = asyncio.create_task(read())
        while len(arrivals) < 50:
            if reader.done():
                reader.result()  # raises what ended the stream
                raise RuntimeError("the endless stream ended before its 50th chunk")
            await asyncio.sleep(0.01)
        baseline = statistics.median(b - a for a, b in zip(arrivals[-40:], arrivals[-39:], strict=False))

        async def health_checks(until: asyncio.Future) -> list[float]:
            took = []
            while not until.done():
                started = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=60)
                took.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)
            return took

        # The huge requests go from another process, so building and sending them does not hold this one.
        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            await loop.run_in_executor(pool, send_huge, target, model, 0)  # started and warm before the window
            await asyncio.sleep(0.5)
            window_start = time.perf_counter()
            huge_calls = loop.run_in_executor(pool, send_huge, target, model, huge)
            checks = asyncio.create_task(health_checks(huge_calls))
            results = await huge_calls
        window_end = time.perf_counter()
        check_times = await checks
        await asyncio.sleep(0.2)
        stream.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        inside = [t for t in arrivals if window_start <= t <= window_end + 0.2]
        around = [arrivals[i] for i in range(len(arrivals)) if arrivals[i] >= window_start]
        gaps = [b - a for a, b in zip([window_start, *around], around, strict=False)]
        return {"huge_requests": huge, "prompt_chars": len(HUGE), "codes": sorted({c for _, c in results}),
                "refused_ms_max": round(max(s for s, _ in results) * 1000, 1),
                "refused_ms_median": round(statistics.median(s for s, _ in results) * 1000, 1),
                "stream_gap_ms_before_median": round(baseline * 1000, 2),
                "stream_gap_ms_max_during": round(max(gaps, default=float("nan")) * 1000, 1),
                "stream_chunks_during": len(inside),
                "health_ms_max": round(max(check_times, default=float("nan")) * 1000, 1),
                "health_checks": len(check_times)}


async def run(args) -> dict:
    logs = Path(args.out)
    logs.mkdir(parents=True, exist_ok=True)
    root = Path(args.server_root) if args.server_root else REPO_ROOT
    loadgen.REPO_ROOT = root  # start_seqserve runs `python -m seqserve.cli` from there: that code is measured
    server = loadgen.start_seqserve(Path(args.repository) if args.repository else REPO_ROOT / "models", logs,
                                    {"SEQSERVE_MAX_NEW_TOKENS": str(ENDLESS_TOKENS)})
    try:
        await wait_ready(server.target, args.model)
        rss_before = rss_mib(server.process.pid)
        result = await measure(server.target, args.model, args.huge)
        result.update(rss_mib_before=round(rss_before, 1), rss_mib_after=round(rss_mib(server.process.pid), 1),
                      server_root=str(root))
        (logs / "big_input.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.big_input", description=__doc__.split("\n")[0])
    parser.add_argument("--huge", type=int, default=8, help="huge prompts sent at once")
    parser.add_argument("--model", default="fortunes-lm")
    parser.add_argument("--repository", help="model repository (default: models/)")
    parser.add_argument("--server-root", help="a checkout whose server code to run (default: this one)")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="big-input-"))
    print(json.dumps(asyncio.run(run(parser.parse_args(argv)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
