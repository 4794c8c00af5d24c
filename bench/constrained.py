"""What a constraint costs the batch: the benchmark LSTM (E=256, H=512, 2 layers, V=8000, a word vocabulary)
in process, N streams all constrained against the same N streams with none, interleaved in one run.

Each run submits N greedy streams together (every stream generates exactly --tokens tokens: the model's
<eos> is all but impossible and the constraint never completes) and times the whole run, prefill included.
The constraint is a regex over the words' text, separators included, that allows about a third of the
vocabulary at every step (`w[1-3][0-9]*( w[1-3][0-9]*)*`), so every step's masks walk the whole token trie.
Reported (medians of --repeats): tokens/s of each kind and their ratio (constrained / none), the mask time
per step (`seqserve_constraint_mask_seconds`) and per constrained row, and the decode call per step.

    python bench/constrained.py [--streams 128] [--tokens 64] [--repeats 3] [--mask-threads 0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry  # noqa: E402

from bench import models  # noqa: E402
from server.bundle import load_bundle  # noqa: E402
from server.decoding import Constraint, DecodingParams  # noqa: E402
from server.decoding.limits import RequestLimits
from server.decoding.matching import ConstraintSettings  # noqa: E402
from server.engine import EngineConfig, GenerationRequest, ModelEngine  # noqa: E402
from server.metrics import Metrics  # noqa: E402

BOS = 1
PATTERN = r"w[1-3][0-9]*( w[1-3][0-9]*)*"


async def engine_run(bundle, streams: int, tokens: int, constrained: bool, mask_threads: int = 0) -> dict:
    registry = CollectorRegistry()
    config = EngineConfig(max_rows=streams, limits=RequestLimits(
        max_new_tokens=tokens, constraints=ConstraintSettings(mask_threads=mask_threads)))
    engine = ModelEngine(bundle, config, Metrics(registry))
    await engine.start()
    try:
        constraint = Constraint.regex(PATTERN) if constrained else None
        params = DecodingParams(max_new_tokens=tokens, min_new_tokens=tokens, constraint=constraint)
        await engine.submit(GenerationRequest("warm", [BOS], DecodingParams(max_new_tokens=4,
                                                                             constraint=constraint))).result()
        started = time.perf_counter()
        handles = [engine.submit(GenerationRequest(f"s{i}", [BOS], params)) for i in range(streams)]
        finishes = await asyncio.gather(*(h.result() for h in handles))
        seconds = time.perf_counter() - started
    finally:
        await engine.stop(1.0)
    generated = sum(len(f.generated_ids) for f in finishes)
    if constrained:
        import re

        assert all(re.fullmatch(PATTERN, f.text) for f in finishes), "an output left the constraint"
    labels = {"model": bundle.name}
    mask_sum = registry.get_sample_value("seqserve_constraint_mask_seconds_sum", labels) or 0.0
    mask_steps = registry.get_sample_value("seqserve_constraint_mask_seconds_count", labels) or 0.0
    decode_sum = registry.get_sample_value("seqserve_decode_step_duration_seconds_sum", labels) or 0.0
    decode_steps = registry.get_sample_value("seqserve_decode_step_duration_seconds_count", labels) or 1.0
    return {"tokens_per_s": generated / seconds, "generated": generated,
            "mask_ms_per_step": 1e3 * mask_sum / mask_steps if mask_steps else 0.0,
            "mask_us_per_row": 1e6 * mask_sum / generated if constrained else 0.0,
            "decode_ms_per_step": 1e3 * decode_sum / decode_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--cache", default="~/.cache/seqserve/bench")
    parser.add_argument("--mask-threads", type=int, default=0, help="llguidance threads (0: cores - 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    built = models.build_lm_bundle(Path(args.cache).expanduser(), models.BENCH_LMS["lstm"],
                                   lambda line: print(line, file=sys.stderr))
    bundle = load_bundle(built.repository / built.name / "1",
                         session_options={"intra_op_num_threads": args.threads, "inter_op_num_threads": 1})
    runs = {"none": [], "constrained": []}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        for kind in runs:
            runs[kind].append(asyncio.run(engine_run(bundle, args.streams, args.tokens, kind == "constrained",
                                                     args.mask_threads)))
    median = {kind: {key: statistics.median(r[key] for r in results) for key in results[0]}
              for kind, results in runs.items()}
    ratios = [c["tokens_per_s"] / n["tokens_per_s"] for c, n in zip(runs["constrained"], runs["none"], strict=True)]
    report = {"streams": args.streams, "tokens": args.tokens, "repeats": args.repeats, "pattern": PATTERN,
              "mask_threads": args.mask_threads,
              "none_tokens_per_s": median["none"]["tokens_per_s"],
              "constrained_tokens_per_s": median["constrained"]["tokens_per_s"],
              "ratio": statistics.median(ratios), "ratios": ratios,
              "mask_ms_per_step": median["constrained"]["mask_ms_per_step"],
              "mask_us_per_row": median["constrained"]["mask_us_per_row"],
              "decode_ms_per_step": median["none"]["decode_ms_per_step"]}
    if args.json:
        print(json.dumps(report))
        return
    print("| streams | tokens | none tok/s | constrained tok/s | ratio | mask ms/step | mask us/row "
          "| decode ms/step |\n"
          "|---|---|---|---|---|---|---|---|\n"
          f"| {args.streams} | {args.tokens} | {report['none_tokens_per_s']:.0f} | "
          f"{report['constrained_tokens_per_s']:.0f} | {report['ratio']:.3f} | {report['mask_ms_per_step']:.2f} | "
          f"{report['mask_us_per_row']:.1f} | {report['decode_ms_per_step']:.2f} |")


if __name__ == "__main__":
    main()
