"""The prefix cache, on against off in one run, through real `seqserve serve` processes over gRPC.

The model is the repository's `fortunes-lm` (a character LSTM, 2 x 512: one token per character, 8 KiB
of state); the texts are Debian's fortunes (`/usr/share/games/fortunes`). Two workloads, each run against
a server with the cache off (`SEQSERVE_PREFIX_CACHE_BYTES=0`) and one with the default cache, one server
at a time, alternating `--repeats` times:

- autocomplete: `--clients` clients (64) each type a `--chars`-character fortune (300) one character at a
  time; every keystroke is a greedy Generate of 8 tokens with the whole text so far, sent when the answer
  to the previous one is complete;
- preamble: `--requests` requests (1,000) = one 400-character preamble + a 20-character tail of their own,
  from 64 concurrent clients, greedy, 8 tokens each.

Reported per workload and setting: prompt tokens, prefill tokens computed (the server's
`seqserve_prefill_tokens_total`), tokens the cache saved (`seqserve_prefix_cache_hit_tokens_total`), TTFT
p50/p99 (client side, request start to first chunk), generated tokens/s over the whole workload, and
whether every answer's text equals the other setting's. Targets (autocomplete): prefill computed <= 5% of
cache-off, TTFT p50 <= 1/5 of cache-off.

    python -m bench.prefix [--clients 64] [--chars 300] [--requests 1000] [--repeats 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.loadgen import REPO_ROOT, start_seqserve, wait_ready
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

MODEL = "fortunes-lm"
FORTUNES = Path("/usr/share/games/fortunes")
NEW_TOKENS = 8
SETTINGS = {"off": {"SEQSERVE_PREFIX_CACHE_BYTES": "0"}, "on": {}}  # "on": the default size
COUNTERS = ("seqserve_prompt_tokens_total", "seqserve_prefill_tokens_total", "seqserve_prefix_cache_hit_tokens_total")


def fortunes(min_chars: int) -> list[str]:
    """Every fortune of at least `min_chars` characters, whitespace folded to single spaces, in file order."""
    texts = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or not path.is_file():  # NAME (text), not NAME.dat / NAME.u8
            continue
        for text in re.split(r"\n%\n", path.read_text(encoding="utf-8", errors="replace")):
            folded = " ".join(text.split())
            if len(folded) >= min_chars:
                texts.append(folded)
    if not texts:
        raise SystemExit(f"no fortune of {min_chars} characters under {FORTUNES}: apt-get install fortunes")
    return texts


@dataclass
class Outcome:
    texts: dict = field(default_factory=dict)  # request key -> the generated text
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    counters: dict = field(default_factory=dict)


async def generate(stub, prompt: str, outcome: Outcome, key) -> None:
    started = time.perf_counter()
    first = None
    call = stub.Generate(pb.GenerateRequest(model=MODEL, prompt=prompt,
                                            options=pb.DecodingOptions(max_new_tokens=NEW_TOKENS)))
    async for response in call:
        if first is None:
            first = time.perf_counter() - started
        if response.HasField("done"):
            outcome.texts[key] = response.done.text
            outcome.tokens += response.done.generated_tokens
    outcome.ttft.append(first)


async def autocomplete(target: str, texts: list[str]) -> Outcome:
    outcome = Outcome()
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]

    async def client(index: int, text: str) -> None:
        stub = pb_grpc.SeqserveStub(channels[index % len(channels)])
        for end in range(1, len(text) + 1):
            await generate(stub, text[:end], outcome, (index, end))

    started = time.perf_counter()
    await asyncio.gather(*(client(i, text) for i, text in enumerate(texts)))
    outcome.seconds = time.perf_counter() - started
    await asyncio.gather(*(channel.close() for channel in channels))
    return outcome


async def preamble(target: str, prompts: list[str], concurrency: int = 64) -> Outcome:
    outcome = Outcome()
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    queue = list(enumerate(prompts))[::-1]

    async def client(index: int) -> None:
        stub = pb_grpc.SeqserveStub(channels[index % len(channels)])
        while queue:
            key, prompt = queue.pop()
            await generate(stub, prompt, outcome, key)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    outcome.seconds = time.perf_counter() - started
    await asyncio.gather(*(channel.close() for channel in channels))
    return outcome


def counters(metrics_port: int, names: tuple[str, ...] = COUNTERS) -> dict[str, float]:
    """The server's current value of each of `names` for MODEL (0 where it has none)."""
    page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    values = {}
    for name in names:
        match = re.search(rf'^{name}{{model="{MODEL}"}} (\S+)$', page, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    return values


async def measure(setting: str, workloads: dict, log) -> dict[str, Outcome]:
    with tempfile.TemporaryDirectory() as logs:
        server = start_seqserve(REPO_ROOT / "models", Path(logs), env=SETTINGS[setting])
        try:
            await wait_ready(server.target, MODEL)
            results = {}
            for name, (run, argument) in workloads.items():
                before = counters(server.metrics_port)
                outcome = await run(server.target, argument)
                after = counters(server.metrics_port)
                outcome.counters = {k: after[k] - before[k] for k in COUNTERS}
                results[name] = outcome
                log(f"  {setting:>3} {name}: {len(outcome.texts)} requests in {outcome.seconds:.1f} s")
            return results
        finally:
            server.stop()


def row(name: str, setting: str, outcome: Outcome) -> dict:
    ttft = sorted(outcome.ttft)
    return {
        "workload": name, "cache": setting, "requests": len(outcome.texts),
        "prompt_tokens": int(outcome.counters["seqserve_prompt_tokens_total"]),
        "prefill_computed": int(outcome.counters["seqserve_prefill_tokens_total"]),
        "cache_saved": int(outcome.counters["seqserve_prefix_cache_hit_tokens_total"]),
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "tokens_per_s": outcome.tokens / outcome.seconds, "seconds": outcome.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqserve bench prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="autocomplete clients (default 64)")
    parser.add_argument("--chars", type=int, default=300, help="characters each client types (default 300)")
    parser.add_argument("--requests", type=int, default=1000, help="preamble requests (default 1000)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of off, on (default 1)")
    parser.add_argument("--json", help="write every row and check here")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rng = random.Random(0)
    typed = [text[: args.chars] for text in rng.sample(fortunes(args.chars), args.clients)]
    long_ones = fortunes(400)
    head = rng.choice(long_ones)[:400]
    tails = [text[start : start + 20] for text in rng.choices(fortunes(60), k=args.requests)
             for start in [rng.randrange(0, len(text) - 20)]]
    workloads = {"autocomplete": (autocomplete, typed), "preamble": (preamble, [head + tail for tail in tails])}

    rows, texts = [], {}
    for round_ in range(args.repeats):
        for setting in ("off", "on"):
            log(f"round {round_ + 1}, cache {setting}")
            outcomes = asyncio.run(measure(setting, workloads, log))
            for name, outcome in outcomes.items():
                rows.append({**row(name, setting, outcome), "round": round_ + 1})
                texts.setdefault(name, {}).setdefault(setting, []).append(outcome.texts)

    checks = {}
    print("| workload | cache | requests | prompt tokens | prefill computed | saved by the cache | TTFT p50 ms "
          "| TTFT p99 ms | tokens/s | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['cache']} | {r['requests']:,} | {r['prompt_tokens']:,} | "
              f"{r['prefill_computed']:,} | {r['cache_saved']:,} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['seconds']:.1f} |")
    for name in workloads:
        off = [r for r in rows if r["workload"] == name and r["cache"] == "off"]
        on = [r for r in rows if r["workload"] == name and r["cache"] == "on"]
        every = texts[name]["off"] + texts[name]["on"]
        same = all(t == every[0] for t in every[1:])

        def ratio(key: str, off=off, on=on) -> float:
            """on / off in each round (side by side), the median over the rounds."""
            return statistics.median(b[key] / a[key] for a, b in zip(off, on, strict=True))

        checks[name] = {"prefill_ratio": ratio("prefill_computed"), "ttft_p50_ratio": ratio("ttft_p50_ms"),
                        "ttft_p99_ratio": ratio("ttft_p99_ms"), "tokens_per_s_ratio": ratio("tokens_per_s"),
                        "outputs_identical": same}
    print()
    for name, c in checks.items():
        print(f"- {name}: prefill computed on/off {c['prefill_ratio']:.2%}, TTFT p50 on/off {c['ttft_p50_ratio']:.3f}, "
              f"p99 {c['ttft_p99_ratio']:.3f}, tokens/s on/off {c['tokens_per_s_ratio']:.2f}, "
              f"outputs identical: {c['outputs_identical']}")
    a = checks["autocomplete"]
    met = a["prefill_ratio"] <= 0.05 and a["ttft_p50_ratio"] <= 0.2 and all(c["outputs_identical"]
                                                                            for c in checks.values())
    print(f"- targets (autocomplete prefill <= 5%, TTFT p50 <= 1/5; outputs identical): {'met' if met else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks}, indent=1) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
