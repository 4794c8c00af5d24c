"""`python -m bench.quality` (`seqserve bench quality`): the trained G2P and fortunes models measured
through the server, once per numeric variant (fp32, fp16, int8), beside published G2P anchors.

Each run is reused when `runs/NAME/best.pt` exists, else trained first (`seqserve train`, time-limited).
It is exported with `--variants fp16,int8` into the cache, and a `seqserve serve` process is started per
variant with `SEQSERVE_VARIANT` (the server's `variant` setting). G2P: greedy (or beam) Translate of the
test words, WER/PER against every reference pronunciation. LM: bits per character from Feed log-probs
when the server serves sessions; otherwise the figures the exporter measured (marked so), plus how
often each variant's greedy generation through the server agrees with fp32's token for token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench.loadgen import REPO_ROOT, start_seqserve
from bench.models import export_run_cached
from bench.serve import DEFAULT_CACHE
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

VARIANTS = ("fp32", "fp16", "int8")
ANCHORS = [  # (system, split, WER %, PER % or None)
    ("g2p-seq2seq LSTM (CMUSphinx)", "cmudict (latest)", 31.0, None),
    ("g2p-seq2seq Transformer (CMUSphinx)", "cmudict (latest)", 30.2, None),
    ("Phonetisaurus (joint n-gram WFST)", "cmudict (latest)", 33.9, None),
    ("Yao & Zweig 2015, bi-LSTM", "PRONALSYL cmudict split", 23.55, 5.45),
    ("Toshniwal & Livescu 2016, attention", "PRONALSYL cmudict split", 20.24, 4.69),
]
FEED_CHARS = 256  # characters per Feed call, within the server's max_input_tokens for a char LM
TRAIN = {"g2p": ("seq2seq", "configs/g2p.toml"), "fortunes-lm": ("lm", "configs/fortunes-lm.toml")}


def ensure_run(run: Path, kind: str, config: str, minutes: float, log) -> None:
    """Reuse `run` if it has a best checkpoint, else train it with the repository's config, time-limited."""
    if (run / "best.pt").is_file():
        return
    log(f"quality: {run}/best.pt missing; training {kind} from {config} for at most {minutes} minutes")
    subprocess.run([sys.executable, "-m", "seqserve.cli", "train", kind, "--config", config, "--set",
                    f"time_limit_minutes={minutes}", "--set", "progress=false", "--out", str(run)],
                   check=True, cwd=REPO_ROOT)


async def g2p_through_server(target: str, model: str, words: list[str], beam: int, batch: int = 64,
                             parallel: int = 8) -> tuple[list[str], float]:
    """Best pronunciation per word via Translate (`batch` words per call, `parallel` calls in flight)."""
    options = pb.DecodingOptions(max_new_tokens=40)
    if beam > 1:
        options.strategy, options.beam_size = pb.DecodingOptions.STRATEGY_BEAM, beam
    chunks = [words[i:i + batch] for i in range(0, len(words), batch)]
    results: list[list[str]] = [[] for _ in chunks]
    gate = asyncio.Semaphore(parallel)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SeqserveStub(channel)

        async def one(index: int) -> None:
            async with gate:
                response = await stub.Translate(pb.TranslateRequest(model=model, sources=chunks[index],
                                                                    options=options), timeout=600)
                results[index] = [t.hypotheses[0].text if t.hypotheses else "" for t in response.translations]

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(chunks))))
    return [h for chunk in results for h in chunk], time.perf_counter() - started


async def lm_through_server(target: str, model: str, docs: list[str], prompts: list[str]) -> dict:
    """Bits per character via sessions' Feed log-probs (if served; every character given <bos> and the
    text before it, no end-of-document term, unlike the exporter's figure), and greedy generations."""
    figures: dict = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SeqserveStub(channel)
        try:
            nats = chars = 0.0
            for doc in docs:
                session = await stub.CreateSession(pb.CreateSessionRequest(model=model), timeout=60)
                for start in range(0, len(doc), FEED_CHARS):  # the state carries over between Feeds
                    piece = doc[start:start + FEED_CHARS]
                    fed = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=piece,
                                                         return_log_probs=True), timeout=60)
                    nats -= sum(t.log_prob for t in fed.token_log_probs)
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=60)
                chars += len(doc)
            figures["bits_per_character"] = nats / chars / math.log(2)
            figures["source"] = "server (Feed log-probs)"
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            figures["note"] = f"sessions not served ({error.code().name}); bpc from the export's metrics.json"
        outputs = []
        for prompt in prompts:
            options = pb.DecodingOptions(max_new_tokens=64, min_new_tokens=64, return_log_probs=False)
            ids: list[int] = []
            async for response in stub.Generate(pb.GenerateRequest(model=model, prompt=prompt, options=options),
                                                timeout=120):
                if response.HasField("chunk"):
                    ids += list(response.chunk.token_ids)
            outputs.append(ids)
        figures["generations"] = outputs
    return figures


async def wait_ready(target: str, model: str, timeout: float = 180.0) -> pb.ModelInfo:
    """The model's ModelInfo once it is loaded (it says which variant the server really serves)."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SeqserveStub(channel)
        while True:
            try:
                info = await stub.GetModel(pb.GetModelRequest(model=model), timeout=10)
                if info.ready:
                    return info
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} not ready on {target} after {timeout:.0f}s")
            await asyncio.sleep(0.3)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two sets of generations chose the same token (up to the first
    difference, the rest of a sequence depends on it, so positions after it count as disagreeing)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += max(len(x), len(y))
        for p, q in zip(x, y, strict=False):
            if p != q:
                break
            same += 1
    return same / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqserve bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--g2p-run", default="runs/g2p")
    p.add_argument("--lm-run", default="runs/fortunes-lm")
    p.add_argument("--variants", default="fp32,fp16,int8")
    p.add_argument("--limit", type=int, default=1000, help="G2P test words (0 = all); LM documents = limit / 10")
    p.add_argument("--beam", type=int, default=1, help="G2P beam size (1 = greedy)")
    p.add_argument("--train-minutes", type=float, default=8.0, help="time limit when a run must be trained")
    args = p.parse_args(argv)
    from training.data.files import read_documents, read_pairs
    from training.evaluate import group_references, score

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    cache = Path(args.cache).expanduser().resolve()
    repository, logs = cache / "quality-models", cache / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    runs = {"g2p": Path(args.g2p_run).resolve(), "fortunes-lm": Path(args.lm_run).resolve()}
    extra = tuple(v for v in variants if v != "fp32")
    for name, run in runs.items():
        ensure_run(run, *TRAIN[name], args.train_minutes, log)
        export_run_cached(run, repository, f"quality-{name}", extra, log)
    g2p_cfg = json.loads((runs["g2p"] / "config.json").read_text())
    refs = group_references(read_pairs(REPO_ROOT / g2p_cfg["test"]))
    words = list(refs)[: args.limit or None]
    lm_cfg = json.loads((runs["fortunes-lm"] / "config.json").read_text())
    docs = read_documents(REPO_ROOT / lm_cfg["test"])[: max(1, (args.limit or 1000) // 10)]
    prompts = [d[:16] for d in docs[:16]]
    table, generations = [], {}
    for variant in variants:
        server = start_seqserve(repository, logs, {"SEQSERVE_VARIANT": variant})
        try:
            for model in ("quality-g2p", "quality-fortunes-lm"):
                info = asyncio.run(wait_ready(server.target, model))
                log(f"{variant}: server reports {model} variant {info.variant!r} on {', '.join(info.providers)}")
                if info.variant != variant:
                    raise SystemExit(f"asked for variant {variant} but the server serves {info.variant}")
            hyps, seconds = asyncio.run(g2p_through_server(server.target, "quality-g2p", words, args.beam))
            figures = score(hyps, [refs[w] for w in words], "g2p")
            lm = asyncio.run(lm_through_server(server.target, "quality-fortunes-lm", docs, prompts))
        finally:
            server.stop()
        generations[variant] = lm.pop("generations")
        if "bits_per_character" not in lm:
            metrics = json.loads((repository / "quality-fortunes-lm" / "1" / "metrics.json").read_text())
            source = metrics if variant == "fp32" else metrics["variants"].get(variant, {})
            lm["bits_per_character"] = source.get("bits_per_character", float("nan"))
        table.append((variant, figures, seconds, lm))
        log(f"{variant}: G2P WER {100 * figures['wer']:.2f}% PER {100 * figures['per']:.2f}% on {len(words)} words "
            f"in {seconds:.1f}s; LM {lm['bits_per_character']:.3f} bpc {lm.get('note', '')}")
    print(render(table, generations, len(words), len(docs), args.beam))
    return 0


def render(table, generations, words: int, docs: int, beam: int) -> str:
    lines = [f"G2P through the server ({words} cmudict test words, {'greedy' if beam == 1 else f'beam {beam}'}); "
             f"fortunes LM ({docs} test documents)", "",
             "| variant | G2P WER % | G2P PER % | WER no stress % | G2P seconds | LM bits/char | LM greedy "
             "agreement with fp32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for variant, figures, seconds, lm in table:
        agree = agreement(generations[variant], generations["fp32"]) if "fp32" in generations else float("nan")
        mark = "" if lm.get("source") else " (export)"
        lines.append(f"| {variant} | {100 * figures['wer']:.2f} | {100 * figures['per']:.2f} | "
                     f"{100 * figures['wer_no_stress']:.2f} | {seconds:.1f} | {lm['bits_per_character']:.3f}{mark} | "
                     f"{agree:.3f} |")
    lines += ["", "Published G2P anchors (other splits: compare the order of magnitude, not the decimals):", "",
              "| system | split | WER % | PER % |", "|---|---|---:|---:|"]
    lines += [f"| {s} | {split} | {w:.2f} | {'-' if per is None else f'{per:.2f}'} |" for s, split, w, per in ANCHORS]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
