"""The GPU check, one script for a machine whose onnxruntime has the CUDA provider (`onnxruntime-gpu`):
does the engine serve on CUDA, do its tokens equal the CPU's, and how fast is it against the bare step.

Writes to --out: `providers.json` (what ONNX Runtime offers, what the bundle's sessions obtained),
`parity.json` (greedy and beam tokens of the same requests on the CPU, on CUDA with plain calls and on
CUDA with IO binding; every difference listed), `engine_on.jsonl` / `engine_off.jsonl`
(`bench/engine_overhead.py --json` with IO binding on and off, bytes host<->device per step included)
and `summary.txt`. Try it on the CPU first (the "GPU" runs then use the CPU provider):

    python bench/gpu_check.py --out /tmp/gpu-check --providers CPUExecutionProvider --rows 1,8 --tokens 8
    python bench/gpu_check.py --out $OUT/gpu-check            # on the GPU machine: CUDA, 1..4096 rows
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_overhead import build_bundle, prompt  # noqa: E402
from server.bundle import load_bundle  # noqa: E402
from server.decoding import DecodingParams  # noqa: E402
from server.engine import EngineConfig, FinishEvent, GenerationRequest, ModelEngine  # noqa: E402

CPU = "CPUExecutionProvider"


async def tokens_of(bundle, io_binding: str, requests: list[tuple[list[int], DecodingParams]]) -> list:
    engine = ModelEngine(bundle, EngineConfig(max_rows=256, io_binding=io_binding))
    await engine.start()

    async def one(prompt_ids, params):
        async for event in engine.submit(GenerationRequest("r", prompt_ids, params)):
            if isinstance(event, FinishEvent):
                return [list(h.tokens) for h in event.hypotheses]

    try:
        return await asyncio.gather(*(one(p, params) for p, params in requests))
    finally:
        await engine.stop(1.0)


def parity(path: Path, providers: list[str], tokens: int) -> dict:
    """Greedy and beam-4 tokens of 32 prompts: CPU, then `providers` with plain calls and with IO binding."""
    requests = [(prompt(1 + i % 9), DecodingParams(max_new_tokens=tokens)) for i in range(24)]
    requests += [(prompt(1 + i % 5), DecodingParams(strategy="beam", beam_size=4, max_new_tokens=tokens))
                 for i in range(8)]
    options = {"intra_op_num_threads": 1}
    cpu = asyncio.run(tokens_of(load_bundle(path, [CPU], options), "off", requests))
    device = load_bundle(path, providers, options)
    report = {"providers": list(device.providers), "requests": len(requests)}
    for mode in ("off", "on"):
        started = time.perf_counter()
        got = asyncio.run(tokens_of(device, mode, requests))
        differ = [{"request": i, "cpu": a, "device": b}
                  for i, (a, b) in enumerate(zip(cpu, got, strict=True)) if a != b]
        report[f"io_binding_{mode}"] = {"equal": not differ, "differences": differ,
                                        "seconds": time.perf_counter() - started}
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider")
    parser.add_argument("--rows", default="1,64,256,1024,4096")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per benchmark run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    providers = args.providers.split(",")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_bundle(Path(tmp))
        bundle = load_bundle(path, providers)
        offered = {"onnxruntime": onnxruntime.__version__, "available": onnxruntime.get_available_providers(),
                   "asked": providers, "obtained": list(bundle.providers)}
        (args.out / "providers.json").write_text(json.dumps(offered, indent=1))
        summary.append(f"providers: {offered}")
        report = parity(path, providers, min(args.tokens, 32))
        (args.out / "parity.json").write_text(json.dumps(report, indent=1))
        verdicts = {m: "equal" if report[f"io_binding_{m}"]["equal"] else "DIFFERENT" for m in ("off", "on")}
        summary.append("parity: " + ", ".join(f"io_binding {m}: {v}" for m, v in verdicts.items()))
        for mode in ("on", "off"):
            command = [sys.executable, str(Path(__file__).with_name("engine_overhead.py")), "--json", "--bundle",
                       str(path), "--providers", args.providers, "--batches", args.rows, "--tokens", str(args.tokens),
                       "--repeats", str(args.repeats), "--io-binding", mode]
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                output, code = run.stdout, run.returncode
                (args.out / f"engine_{mode}.err").write_text(run.stderr[-20000:])
            except subprocess.TimeoutExpired as error:
                output, code = error.stdout or "", "timeout"
                output = output.decode() if isinstance(output, bytes) else output
            (args.out / f"engine_{mode}.jsonl").write_text(output)
            summary.append(f"engine io_binding={mode}: exit {code}, {len(output.splitlines())} row counts")
    (args.out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
