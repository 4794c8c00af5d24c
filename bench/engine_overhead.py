"""How much the engine adds to ONNX Runtime's own decode step, in process (no gRPC), at several row counts.

Builds an LSTM LM bundle with random weights (E=256, H=512, 2 layers, V=8000; or reuses --bundle), then
for each row count N, --repeats times (engine and bare interleaved, so load from other processes hits
both alike; medians reported):
- engine: N greedy streams submitted together (each consumed by its own task, as the gRPC layer would),
  every stream forced to generate exactly --tokens tokens. Each decode call of the runner is timed:
  `decode_ms` is the median call on all N rows, `whole_step_ms` the median time from the start of one
  such call to the start of the next (everything the engine does per step: the call, choosing, text,
  events, delivery, waiting for the GIL); `tokens_per_s` counts the whole run (prefill included);
  `ttft_steps` is the median time to first token over the median whole step (every stream's prompt is
  <bos> and --prompt-tokens - 1 more tokens, all arriving at once). CPU time per step, which load from
  other processes hardly changes: `decode_cpu_ms` (the decode calls), `worker_cpu_ms` (the engine's
  worker thread outside the graph calls: planning, choosing, text, events), `loop_cpu_ms` (the asyncio thread:
  delivery and the streams' consumers);
- bare: the same model's decode step through ONNX Runtime alone (the runner's call, nothing else) on N
  rows, the same session options; and the prefill of the N prompts in one call (`bare_prefill_steps`:
  its time over the bare step, the floor under `ttft_steps`).
Prints a Markdown table, or with --json one JSON object per row count (rows, bare_ms, decode_ms,
whole_step_ms, the ratios to bare_ms, tokens_per_s, bare_tokens_per_s, ttft_steps, bare_prefill_steps,
decode_cpu_ms, worker_cpu_ms, loop_cpu_ms, bytes_to_device_per_step and bytes_to_host_per_step (with IO
binding: what crossed between host and device per step, NaN without), io_binding, providers, repeats).

    python bench/engine_overhead.py [--tokens 64] [--batches 1,8,32,128] [--repeats 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.bundle import load_bundle  # noqa: E402
from server.decoding import DecodingParams  # noqa: E402
from server.decoding.limits import RequestLimits  # noqa: E402
from server.engine import EngineConfig, GenerationRequest, ModelEngine, TokenEvent  # noqa: E402
from server.engine.batch import DecodeBatch  # noqa: E402
from server.engine.runner import Runner  # noqa: E402
from server.metrics import Metrics  # noqa: E402

BOS = 1


def build_bundle(directory: Path) -> Path:
    """An untrained LSTM LM exported as a loadable bundle (no parity check: there is nothing to compare)."""
    import onnxruntime
    import torch

    from exporters.bundle import TOKENIZER_FILES, model_sizes, special_tokens
    from exporters.onnx_graphs import OPSET, export_graphs
    from seqserve.bundle import sha256_file, write_manifest
    from seqserve.v1.manifest_pb2 import Manifest, ModelKind
    from training.models import LanguageModel, LMArgs
    from training.tokenizer import train_tokenizer

    torch.manual_seed(0)
    model = LanguageModel(LMArgs(vocab_size=8000, cell="lstm", embedding_size=256, hidden_size=512,
                                 num_layers=2, dropout=0.0)).eval()
    bundle = directory / "bench-lm" / "1"
    bundle.mkdir(parents=True)
    graphs = export_graphs(model, bundle)
    # A char tokenizer is enough: the model's vocabulary may be larger than the tokenizer's.
    tokenizer = train_tokenizer("char", ["the quick brown fox jumps over the lazy dog"])
    tokenizer.save(str(bundle / TOKENIZER_FILES["text"]))
    manifest = Manifest(schema_version=1, name="bench-lm", version=1, kind=ModelKind.MODEL_KIND_LM, cell="lstm",
                        sizes=model_sizes(model), special_tokens=special_tokens({"text": tokenizer}),
                        tokenizers={"text": TOKENIZER_FILES["text"]}, graphs=graphs, opset=OPSET,
                        onnxruntime_version=onnxruntime.__version__, torch_version=torch.__version__)
    manifest.sha256.update({p.name: sha256_file(p) for p in sorted(bundle.iterdir())})
    write_manifest(manifest, bundle / "manifest.json")
    return bundle


def prompt(length: int) -> list[int]:
    return [BOS] + [4 + i % 20 for i in range(length - 1)]


async def engine_run(bundle, streams: int, tokens: int, prompt_tokens: int = 1, io_binding: str = "auto") -> dict:
    metrics = Metrics()
    config = EngineConfig(max_rows=max(streams, 1), max_queued=max(1024, streams),
                          limits=RequestLimits(max_new_tokens=tokens), io_binding=io_binding)
    engine = ModelEngine(bundle, config, metrics)
    calls: list[tuple[float, float, int]] = []  # (start, end, rows) of every decode call
    model_cpu: dict[tuple[str, int], float] = {}  # (call, thread id) -> CPU seconds inside the graph calls
    decode, prefill = engine.runner.decode, engine.runner.prefill

    def timed_decode(batch):
        started, cpu = time.perf_counter(), time.thread_time()
        outputs = decode(batch)
        calls.append((started, time.perf_counter(), len(batch)))
        key = ("decode", threading.get_ident())
        model_cpu[key] = model_cpu.get(key, 0.0) + time.thread_time() - cpu
        return outputs

    def timed_prefill(*args, **kwargs):
        cpu = time.thread_time()
        outputs = prefill(*args, **kwargs)
        key = ("prefill", threading.get_ident())
        model_cpu[key] = model_cpu.get(key, 0.0) + time.thread_time() - cpu
        return outputs

    # The engine's core calls its runner through these attributes.
    engine.runner.decode, engine.runner.prefill = timed_decode, timed_prefill
    await engine.start()
    params = DecodingParams(max_new_tokens=tokens, min_new_tokens=tokens)  # no early <eos>: fixed work

    async def consume(stream, submitted: float) -> tuple[int, float]:
        count, first = 0, None
        async for event in stream:
            if isinstance(event, TokenEvent):
                count += len(event.token_ids)
                if first is None and event.token_ids:
                    first = time.perf_counter() - submitted
        return count, first

    # Warm up (first-call allocations), then measure.
    await consume(engine.submit(GenerationRequest("warm", [BOS], DecodingParams(max_new_tokens=4))), 0.0)
    calls.clear()
    model_cpu.clear()
    worker = engine._thread
    worker_clock = time.pthread_getcpuclockid(worker.ident)
    worker_before, loop_before = time.clock_gettime(worker_clock), time.thread_time()
    bound = engine.runner.bound
    sent_before = (bound.bytes_to_device, bound.bytes_to_host) if bound is not None else (0, 0)
    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"s{i}", prompt(prompt_tokens), params)) for i in range(streams)]
    results = await asyncio.gather(*(consume(h, started) for h in handles))
    wall = time.perf_counter() - started
    worker_cpu, loop_cpu = time.clock_gettime(worker_clock) - worker_before, time.thread_time() - loop_before
    bound = engine.runner.bound
    sent = ((bound.bytes_to_device - sent_before[0], bound.bytes_to_host - sent_before[1]) if bound is not None
            else (float("nan"), float("nan")))
    await engine.stop(1.0)
    full = [(start, end) for start, end, rows in calls if rows == streams]
    whole = statistics.median(b[0] - a[0] for a, b in zip(full, full[1:], strict=False))
    return {"tokens_per_s": sum(count for count, _ in results) / wall,
            "decode_s": statistics.median(end - start for start, end in full),
            "whole_step_s": whole,
            "ttft_steps": statistics.median(first for _, first in results) / whole,
            "decode_cpu_s": sum(cpu for (call, _), cpu in model_cpu.items() if call == "decode") / tokens,
            "worker_cpu_s": (worker_cpu - sum(cpu for (_, thread), cpu in model_cpu.items()
                                              if thread == worker.ident)) / tokens,
            "loop_cpu_s": loop_cpu / tokens,
            "bytes_to_device_per_step": sent[0] / tokens, "bytes_to_host_per_step": sent[1] / tokens}


def bare_prefill(bundle, rows: int, prompt_tokens: int, repeats: int) -> float:
    """Median seconds of the prefill of `rows` prompts in one call, first-token log-probs included."""
    runner = Runner(bundle)
    prompts = [prompt(prompt_tokens)] * rows
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        runner.prefill(prompts, runner.zero_state(rows), want_last=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def bare_step(bundle, rows: int, repeats: int) -> float:
    """Median seconds of one ONNX Runtime decode step on `rows` rows (the runner's call, nothing else)."""
    runner = Runner(bundle)
    batch = DecodeBatch(runner.zero_state(rows), np.full(rows, BOS, dtype=np.int64), np.arange(rows),
                        np.zeros(rows, dtype=np.int64))
    runner.decode(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.decode(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(bundle, streams: int, tokens: int, repeats: int, prompt_tokens: int = 1, io_binding: str = "auto") -> dict:
    """Engine and bare step on `streams` rows, interleaved `repeats` times; medians."""
    runs, bares, prefills = [], [], []
    for _ in range(repeats):
        runs.append(asyncio.run(engine_run(bundle, streams, tokens, prompt_tokens, io_binding)))
        bares.append(bare_step(bundle, streams, repeats=max(10, tokens // 2)))
        prefills.append(bare_prefill(bundle, streams, prompt_tokens, repeats=3))
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    bare = statistics.median(bares)
    return {"rows": streams, "bare_ms": bare * 1e3, "decode_ms": median["decode_s"] * 1e3,
            "whole_step_ms": median["whole_step_s"] * 1e3, "decode_over_bare": median["decode_s"] / bare,
            "whole_step_over_bare": median["whole_step_s"] / bare, "tokens_per_s": median["tokens_per_s"],
            "bare_tokens_per_s": streams / bare, "ttft_steps": median["ttft_steps"],
            "bare_prefill_steps": statistics.median(prefills) / bare, "prompt_tokens": prompt_tokens,
            **{f"{name}_ms": median[f"{name}_s"] * 1e3 for name in ("decode_cpu", "worker_cpu", "loop_cpu")},
            "bytes_to_device_per_step": median["bytes_to_device_per_step"],
            "bytes_to_host_per_step": median["bytes_to_host_per_step"], "io_binding": io_binding,
            "providers": list(bundle.providers), "repeats": repeats}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated by every stream")
    parser.add_argument("--batches", default="1,8,32,128", help="concurrent streams, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="engine and bare runs per row count (medians)")
    parser.add_argument("--prompt-tokens", type=int, default=1, help="tokens of every prompt, <bos> included")
    parser.add_argument("--providers", default="CPUExecutionProvider", help="ONNX Runtime providers, in order")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--io-binding", default="auto", choices=("auto", "on", "off"),
                        help="the engine's decode step through IO binding (auto: on a CUDA device)")
    parser.add_argument("--bundle", type=Path, help="a bundle directory to use (default: build one, in a temp dir)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row count instead of a table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.bundle if args.bundle is not None else build_bundle(Path(tmp))
        bundle = load_bundle(path, args.providers.split(","), {"intra_op_num_threads": args.threads})
        if not args.json:
            print(f"providers: {list(bundle.providers)}; {args.tokens} tokens per stream; medians of "
                  f"{args.repeats}\n")
            print("| rows | engine tokens/s | bare tokens/s | decode call ms | whole step ms | bare step ms "
                  "| decode / bare | whole step / bare | TTFT steps | bare prefill steps |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for streams in (int(b) for b in args.batches.split(",")):
            row = measure(bundle, streams, args.tokens, args.repeats, args.prompt_tokens, args.io_binding)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"| {streams} | {row['tokens_per_s']:,.0f} | {row['bare_tokens_per_s']:,.0f} "
                      f"| {row['decode_ms']:.2f} | {row['whole_step_ms']:.2f} | {row['bare_ms']:.2f} "
                      f"| {row['decode_over_bare']:.2f} | {row['whole_step_over_bare']:.2f} "
                      f"| {row['ttft_steps']:.1f} | {row['bare_prefill_steps']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
