"""`python -m bench.serve` (`seqserve bench serve`): the concurrency sweep against seqserve and the
baselines, side by side in one run, plus the ceiling, the engine-overhead, TTFT and beam checks.

Every server runs in its own process (its CPU is read from /proc); the load generator runs in this one.
Points are interleaved (for each concurrency, every target in turn) and repeated, so load from other
processes on a shared machine hits all targets alike; medians are reported. Outputs: results.csv,
results.md and results.png in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import models
from bench.baselines import BareStep, bare_decoder_step, gemm_flops, machine_info, ort_bare_step
from bench.loadgen import (
    MIXES,
    LoadSpec,
    ServerProcess,
    run_load,
    start_baseline,
    start_seqserve,
    wait_ready,
    word_prompts,
)

DEFAULT_CACHE = Path(os.environ.get("SEQSERVE_BENCH_CACHE", Path.home() / ".cache" / "seqserve" / "bench"))
TARGETS = ("seqserve", "seqserve-alt", "torch", "ort", "null")  # seqserve-alt: seqserve with --alt-env settings


@dataclass
class Point:
    """One measured point: the load generator's summary plus the server-side figures."""

    model: str
    target: str
    repeat: int
    row: dict
    extra: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        return {"model": self.model, "target": self.target, "repeat": self.repeat, **self.row, **self.extra}


async def measure(server: ServerProcess, spec: LoadSpec) -> tuple[dict, dict, list[str]]:
    cpu = lambda: (server.cpu_seconds(), server.main_thread_cpu_seconds())  # noqa: E731
    before_m, (before_cpu, before_loop) = server.metrics(spec.model), cpu()
    report = await run_load(server.target, spec)
    after_m, (after_cpu, after_loop) = server.metrics(spec.model), cpu()
    row = report.summary()
    extra = {"server_cpu": (after_cpu - before_cpu) / report.seconds,
             "loop_cpu": (after_loop - before_loop) / report.seconds}
    if before_m:
        d = {k: after_m[k] - before_m[k] for k in after_m}
        steps = d["seqserve_batch_size_count"]
        extra.update(
            steps=steps, mean_rows=d["seqserve_batch_size_sum"] / steps if steps else float("nan"),
            step_ms=1000 * d["seqserve_decode_step_duration_seconds_sum"] / steps if steps else float("nan"),
            wall_per_step_ms=1000 * report.seconds / steps if steps else float("nan"),
            server_ttft_ms=1000 * d["seqserve_time_to_first_token_seconds_sum"]
            / max(d["seqserve_time_to_first_token_seconds_count"], 1),
            queue_wait_ms=1000 * d["seqserve_queue_wait_seconds_sum"] / max(d["seqserve_queue_wait_seconds_count"], 1))
    notes = report.notes + ([f"{row['errors']} errors, first: {report.first_error()}"] if row["errors"] else [])
    return row, extra, notes


async def sweep(args, bundle: models.BenchBundle, servers: dict[str, ServerProcess], prompts,
                bare: BareStep | None = None, log=print) -> list[Point]:
    """Every concurrency x target, repeated. Around each seqserve point the bare ORT step is timed (just
    before, and just after at the rows per step the engine ran), so drifting outside load hits both."""
    points = []
    for server in servers.values():  # warm-up: load the model, fill caches, start threads
        await wait_ready(server.target, bundle.name)
        await run_load(server.target, LoadSpec(bundle.name, 4, prompts=prompts, output_tokens=8, requests=8,
                                               duration=30))
    for repeat in range(args.repeats):
        for concurrency in args.concurrency:
            for target, server in servers.items():
                spec = LoadSpec(bundle.name, concurrency, tuple(args.mix), prompts, args.output_tokens,
                                args.output_jitter, args.requests, args.duration, args.beam_size, seed=repeat)
                before = bare.seconds(min(concurrency, 256), 0.5) if bare is not None and server.metrics_port else 0
                row, extra, notes = await measure(server, spec)
                if bare is not None and extra.get("steps"):
                    rows = max(1, round(extra["mean_rows"]))
                    # timed just before and just after the point, so drifting outside load hits both sides
                    after = bare.seconds(rows, 0.5)
                    extra["bare_ms"] = 1000 * (after + (before if rows == min(concurrency, 256) else after)) / 2
                    extra["overhead"] = extra["step_ms"] / extra["bare_ms"]
                    extra["wall_overhead"] = extra["wall_per_step_ms"] / extra["bare_ms"]
                points.append(Point(bundle.name, target, repeat, row, extra))
                engine = (f", rows/step {extra['mean_rows']:.1f}, step {extra['step_ms']:.2f} ms, bare "
                          f"{extra.get('bare_ms', float('nan')):.2f} ms" if extra.get("steps") else "")
                log(f"{bundle.name} {target:>8} c={concurrency:<4} r{repeat}: {row['tokens_per_s']:8.0f} tok/s, "
                    f"TTFT p50 {row['ttft_p50_ms']:8.1f} ms, ITL p50 {row['itl_p50_ms']:6.2f} ms, "
                    f"server CPU {extra['server_cpu']:.2f}, client CPU {row['client_cpu']:.2f}{engine}"
                    + ("; " + "; ".join(notes) if notes else ""))
    return points


async def beam_vs_greedy(server: ServerProcess, name: str, sources: list[str], repeats: int, beam_size: int = 5,
                         max_new_tokens: int = 32) -> dict:
    """Wall time of one Translate of `sources` greedily and with beam search, alternating; medians."""
    import grpc

    from seqserve.v1 import service_pb2 as pb
    from seqserve.v1 import service_pb2_grpc as pb_grpc

    greedy = pb.DecodingOptions(strategy=pb.DecodingOptions.STRATEGY_GREEDY, max_new_tokens=max_new_tokens)
    beam = pb.DecodingOptions(strategy=pb.DecodingOptions.STRATEGY_BEAM, beam_size=beam_size,
                              max_new_tokens=max_new_tokens)
    times: dict[str, list[float]] = {"greedy": [], "beam": []}
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.SeqserveStub(channel)
        for index in range(repeats + 1):
            for label, options in (("greedy", greedy), ("beam", beam)):
                started = time.perf_counter()
                await stub.Translate(pb.TranslateRequest(model=name, sources=sources, options=options), timeout=300)
                if index:  # the first round warms up
                    times[label].append(time.perf_counter() - started)
    g, b = statistics.median(times["greedy"]), statistics.median(times["beam"])
    return {"sources": len(sources), "beam_size": beam_size, "greedy_s": g, "beam_s": b, "ratio": b / g,
            "ratios": [bb / gg for gg, bb in zip(times["greedy"], times["beam"], strict=True)]}


def run_all(args) -> int:
    cache = Path(args.cache).expanduser().resolve()
    out = Path(args.out or cache / "results").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    bundles = [models.build_lm_bundle(cache, models.BENCH_LMS[m.strip()], log) for m in args.models.split(",")]
    g2p = models.build_seq2seq_bundle(cache, args.g2p_run, progress=log) if args.beam_check else None
    from server.config import ServerConfig

    session_options = ServerConfig().session_options
    max_rows = ServerConfig().max_rows_per_step
    log("ceiling: fp32 GEMM and the bare ONNX Runtime step (no servers running)")
    gemm = gemm_flops()
    bare = {b.name: ort_bare_step(b.repository / b.name / "1", sorted({min(c, max_rows) for c in args.concurrency}),
                                  session_options=session_options) for b in bundles}
    env = dict(item.split("=", 1) for item in args.server_env)
    seqserve = start_seqserve(cache / "models", out / "logs", env)
    targets = [t for t in args.targets.split(",") if t]
    own = {"seqserve": seqserve}
    if "seqserve-alt" in targets:
        alt_logs = out / "logs" / "alt"
        alt_logs.mkdir(exist_ok=True)
        own["seqserve-alt"] = start_seqserve(cache / "models", alt_logs,
                                             {**env, **dict(item.split("=", 1) for item in args.alt_env)})
    points, beam, staggered = [], None, {}
    try:
        for bundle in bundles:
            servers = {t: own[t] if t in own else start_baseline(t, bundle, out / "logs", args.torch_threads)
                       for t in targets}
            spec = models.BENCH_LMS[bundle.name.removeprefix("bench-")]
            prompts = word_prompts(models.lm_words(spec), args.prompt_tokens)
            try:
                bare_step = BareStep(bundle.repository / bundle.name / "1", session_options)
                points += asyncio.run(sweep(args, bundle, servers, prompts, bare_step, log))
                if args.ttft_check and "seqserve" in servers:
                    staggered[bundle.name] = asyncio.run(ttft_check(args, bundle, seqserve, prompts, bare_step, log))
            finally:
                for server in servers.values():
                    if server not in own.values():
                        server.stop()
        if g2p is not None:
            asyncio.run(wait_ready_translate(seqserve, g2p.name))
            beam = []
            for count in args.beam_check:
                sources = models.g2p_sources(count)
                beam.append(asyncio.run(beam_vs_greedy(seqserve, g2p.name, sources, max(5, args.repeats))))
                # The floor on this machine: one bare decoder step on 5 rows per source against 1 row.
                bundle_dir = g2p.repository / g2p.name / "1"
                one, five = (bare_decoder_step(bundle_dir, sources, k, session_options=session_options)
                             for k in (1, beam[-1]["beam_size"]))
                beam[-1].update(bare_greedy_ms=1000 * one, bare_beam_ms=1000 * five, bare_ratio=five / one)
                log(f"beam 5 vs greedy, one Translate of {count} sources: greedy {beam[-1]['greedy_s']:.3f}s, "
                    f"beam {beam[-1]['beam_s']:.3f}s, ratio {beam[-1]['ratio']:.2f}; bare decoder step "
                    f"{1000 * one:.2f} ms at {count} rows, {1000 * five:.2f} ms at {count * 5} rows "
                    f"(ratio {five / one:.2f})")
    finally:
        for server in own.values():
            server.stop()
    write_outputs(out, args, bundles, points, gemm, bare, beam, machine_info(), lines, staggered)
    return 0


async def ttft_check(args, bundle, server: ServerProcess, prompts, bare: BareStep, log) -> dict:
    """TTFT at `--ttft-check` streams with output lengths drawn in 64 * (1 +- 0.5), so requests arrive
    staggered as in real traffic rather than in the lock-step waves of fixed-length closed-loop streams."""
    concurrency = args.ttft_check
    spec = LoadSpec(bundle.name, concurrency, ("greedy",), prompts, args.output_tokens, 0.5, 6 * concurrency,
                    2 * args.duration, seed=99)
    row, extra, notes = await measure(server, spec)
    extra["bare_ms"] = 1000 * bare.seconds(max(1, round(extra["mean_rows"])))
    result = {**row, **extra, "notes": notes}
    log(f"{bundle.name} TTFT check, {concurrency} staggered streams: TTFT p50 {row['ttft_p50_ms']:.1f} ms, "
        f"step {extra['step_ms']:.2f} ms (bare {extra['bare_ms']:.2f} ms) at {extra['mean_rows']:.1f} rows, "
        f"ratio {row['ttft_p50_ms'] / extra['step_ms']:.1f}; server-side TTFT mean {extra['server_ttft_ms']:.1f} ms, "
        f"of which waiting for admission (queue wait mean) {extra['queue_wait_ms']:.1f} ms")
    return result


async def wait_ready_translate(server: ServerProcess, name: str, timeout: float = 120.0) -> None:
    import grpc

    from seqserve.v1 import service_pb2 as pb
    from seqserve.v1 import service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(server.target) as channel:
        while True:
            try:
                await pb_grpc.SeqserveStub(channel).Translate(pb.TranslateRequest(model=name, sources=["a"]),
                                                              timeout=30)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


# --- outputs ------------------------------------------------------------------------------------------

def medians(points: list[Point]) -> list[dict]:
    """One row per (model, concurrency, target): the median of every figure over the repeats."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p.model, p.row["concurrency"], p.target), []).append(p.as_row())
    rows = []
    for (model, concurrency, target), group in groups.items():
        row = {"model": model, "concurrency": concurrency, "target": target, "repeats": len(group)}
        for key, value in group[0].items():
            if key not in row and isinstance(value, (int, float)):
                values = [g[key] for g in group if g.get(key) == g.get(key)]  # NaN-free
                row[key] = statistics.median(values) if values else float("nan")
        rows.append(row)
    return rows


def ratio(points: list[Point], model: str, concurrency: int, over: str, key: str = "tokens_per_s") -> float:
    """Median over repeats of seqserve's `key` divided by `over`'s, each pair measured back to back."""
    by = {(p.target, p.repeat): p.row[key] for p in points if p.model == model and p.row["concurrency"] == concurrency}
    pairs = [by["seqserve", r] / by[over, r] for (t, r) in by if t == "seqserve" and by.get((over, r))]
    return statistics.median(pairs) if pairs else float("nan")


def write_outputs(out: Path, args, bundles, points, gemm, bare, beam, machine: str, lines: list[str],
                  staggered: dict | None = None) -> None:
    import csv

    raw = [p.as_row() for p in points]
    columns = list(dict.fromkeys(k for row in raw for k in row))
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(raw)
    table = medians(points)
    peak = max(gemm.values())
    md = [f"# seqserve bench serve, {time.strftime('%Y-%m-%d %H:%M')}", "",
          f"Machine: {machine}", "", "Command: `" + " ".join(["python -m bench.serve", *sys.argv[1:]]) + "`", "",
          "GEMM (fp32, 1024^3): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in gemm.items()), ""]
    for bundle in bundles:
        md += [f"## {bundle.name}: {bundle.flops_per_token / 1e6:.2f} MFLOP/token, GEMM ceiling "
               f"{peak / bundle.flops_per_token:,.0f} tokens/s", "",
               "| batch | bare ORT step ms | bare ORT tokens/s |", "|---:|---:|---:|"]
        md += [f"| {b} | {s * 1e3:.2f} | {b / s:,.0f} |" for b, s in sorted(bare[bundle.name].items())]
        md += ["", "| streams | target | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
               "rows/step | step ms (hist) | bare ORT ms @rows | step/bare | wall/step ms | server CPU | CPU us/tok | "
               "loop us/tok | tok/msg | x torch |",
               "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in sorted((r for r in table if r["model"] == bundle.name), key=lambda r: (r["concurrency"],
                                                                                         TARGETS.index(r["target"]))):
            seq = row["target"] == "seqserve"
            versus = ratio(points, bundle.name, row["concurrency"], "torch") if seq else float("nan")
            md.append(f"| {row['concurrency']} | {row['target']} | {row['tokens_per_s']:,.0f} | "
                      f"{row['requests_per_s']:.2f} | {row['ttft_p50_ms']:.1f} | {row['ttft_p99_ms']:.1f} | "
                      f"{row['itl_p50_ms']:.2f} | {row['itl_p99_ms']:.2f} | {_f(row.get('mean_rows'), 1)} | "
                      f"{_f(row.get('step_ms'))} | {_f(row.get('bare_ms'))} | {_f(row.get('overhead'))} | "
                      f"{_f(row.get('wall_per_step_ms'))} | "
                      f"{row['server_cpu']:.2f} | {_per_token_us(row):.0f} | {_per_token_us(row, 'loop_cpu'):.0f} | "
                      f"{row['tokens_per_message']:.2f} | "
                      f"{_f(versus, 1)} |")
        md.append("")
        md += checks(points, bundle.name, (staggered or {}).get(bundle.name), args)
    for b in beam or []:
        md += [f"- beam {b['beam_size']} vs greedy, one Translate of {b['sources']} G2P sources: greedy "
               f"{b['greedy_s']:.3f} s, beam {b['beam_s']:.3f} s, ratio {b['ratio']:.2f} "
               f"({'met' if b['ratio'] <= 1.5 else 'MISSED'}, target <= 1.5; per repeat: "
               + ", ".join(f"{r:.2f}" for r in b["ratios"]) + "); the bare ONNX Runtime decoder step on "
               f"{b['beam_size']} rows per source costs {b['bare_ratio']:.2f}x the step on one "
               f"({b['bare_beam_ms']:.2f} / {b['bare_greedy_ms']:.2f} ms)"]
    md.append("")
    md += ["## Log", "", "```", *lines, "```", ""]
    (out / "results.md").write_text("\n".join(md), encoding="utf-8")
    plot(out / "results.png", table, bundles)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}")


def checks(points: list[Point], model: str, staggered: dict | None, args) -> list[str]:
    """The issue's targets, each with its measured figure (medians over repeats, ratios side by side)."""
    table = {(r["target"], r["concurrency"]): r for r in medians([p for p in points if p.model == model])}
    lines = ["Targets:", ""]
    if ("seqserve", 128) in table and ("torch", 128) in table:
        x = ratio(points, model, 128, "torch")
        lines.append(f"- 128 greedy streams, seqserve / hand-written PyTorch tokens/s: {x:.1f}x "
                     f"({'met' if x >= 30 else 'MISSED'}, target >= 30x)")
    over = {c: r["overhead"] for (t, c), r in sorted(table.items()) if t == "seqserve" and r.get("overhead") == r.get(
        "overhead") and "overhead" in r}
    if over:
        lines.append("- engine decode step (histogram) / bare ORT step at the same rows: " + ", ".join(
            f"{c} streams {v:.2f}" for c, v in over.items()) + f" ({'met' if max(over.values()) <= 1.3 else 'MISSED'}"
            ", target <= 1.3); the whole engine step (wall time per step, prefill and choosing included) / bare: "
            + ", ".join(f"{c} streams {table['seqserve', c]['wall_overhead']:.2f}" for c in over))
    fixed = table.get(("seqserve", 32))
    for label, row in (("fixed-length (lock-step waves)", fixed), ("staggered lengths", staggered)):
        if row and row.get("step_ms"):
            r = row["ttft_p50_ms"] / row["step_ms"]
            lines.append(f"- TTFT p50 at 32 streams, {label}: {row['ttft_p50_ms']:.1f} ms = {r:.1f} decode steps of "
                         f"{row['step_ms']:.2f} ms ({'met' if r <= 3 else 'MISSED'}, target <= 3)")
    for c in sorted({c for t, c in table if t == "null"}):
        if ("seqserve", c) in table:
            n, q = table["null", c], table["seqserve", c]
            lines.append(f"- message path at {c} streams: null server (no model, one message per token) "
                         f"{n['tokens_per_s']:,.0f} tok/s, its loop thread {_per_token_us(n, 'loop_cpu'):.0f} us CPU "
                         f"per token; seqserve {q['tokens_per_s']:,.0f} tok/s, loop thread "
                         f"{_per_token_us(q, 'loop_cpu'):.0f} us/token ({q['loop_cpu']:.2f} of a core busy), "
                         f"{q['tokens_per_message']:.2f} tokens per message")
    return [*lines, ""]


def _per_token_us(row: dict, key: str = "server_cpu") -> float:
    """Server CPU (whole process, or the asyncio loop's thread with key='loop_cpu') per generated token."""
    return 1e6 * row[key] / row["tokens_per_s"] if row["tokens_per_s"] else float("nan")


def _f(value, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def plot(path: Path, table: list[dict], bundles) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for bundle in bundles:
        for target in TARGETS:
            rows = sorted((r for r in table if r["model"] == bundle.name and r["target"] == target),
                          key=lambda r: r["concurrency"])
            if rows:
                label = f"{target} ({bundle.name})" if len(bundles) > 1 else target
                x = [r["concurrency"] for r in rows]
                axes[0].plot(x, [r["tokens_per_s"] for r in rows], marker="o", label=label)
                axes[1].plot(x, [r["ttft_p50_ms"] for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("generated tokens/s", "TTFT p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqserve bench serve", description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where bundles are built and kept (%(default)s)")
    p.add_argument("--out", default="", help="results directory (default: CACHE/results)")
    p.add_argument("--models", default="lstm", help="benchmark LMs: lstm,gru (default lstm)")
    p.add_argument("--targets", default="seqserve,torch,ort,null", help="servers to sweep, from " + ",".join(TARGETS))
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32, 128, 512])
    p.add_argument("--mix", default="greedy", help="request strategies cycled: " + ",".join(MIXES))
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--output-jitter", type=float, default=0.0, help="output length drawn in n*(1 +- j)")
    p.add_argument("--requests", type=int, default=0, help="request budget per point (0 = 2 per stream)")
    p.add_argument("--duration", type=float, default=12.0, help="time limit per point, seconds")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--beam-size", type=int, default=4, help="beam width of 'beam' requests in the mix")
    p.add_argument("--beam-check", type=ints, default=[1, 8, 32],
                   help="G2P batch sizes (sources per Translate) for beam 5 vs greedy ('' = skip)")
    p.add_argument("--g2p-run", default="runs/g2p", help="trained G2P run for the beam check (else random)")
    p.add_argument("--ttft-check", type=int, default=32, help="streams of the staggered TTFT check (0 = skip)")
    p.add_argument("--torch-threads", type=int, default=0, help="PyTorch baseline threads (0 = its default)")
    p.add_argument("--alt-env", action="append", default=[],
                   help="KEY=VALUE for a second seqserve server, target seqserve-alt (SEQSERVE_INTRA_OP_THREADS=1)")
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the seqserve server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.mix = [m.strip() for m in args.mix.split(",") if m.strip()]
    unknown = [m for m in args.mix if m not in MIXES] + [t for t in args.targets.split(",") if t not in TARGETS]
    if unknown:
        print(f"seqserve bench serve: unknown mix or target {unknown}", file=sys.stderr)
        return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
