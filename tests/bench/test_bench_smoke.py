"""Smoke run of the benchmark harness: a tiny random-weight bundle served by a real seqserve server on
port 0, a few requests from the load generator, the engine figures from /metrics, and the report files
with their columns. Seconds, not minutes."""

from __future__ import annotations

import asyncio
import csv
import os
from argparse import Namespace
from types import SimpleNamespace

import pytest

from bench import loadgen, models, serve
from bench.loadgen import SUMMARY_COLUMNS, LoadSpec, ServerProcess, run_load, word_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> models.BenchBundle:
    return models.build_lm_bundle(tmp_path_factory.mktemp("bench-cache"), models.TINY_LM, progress=lambda _: None)


@pytest.fixture(scope="module")
def seqserve_server(tiny_bundle):
    from server.app import ServerThread
    from server.config import ServerConfig

    config = ServerConfig(repository=str(tiny_bundle.repository), port=0, metrics_port=0,
                          poll_interval_seconds=0, log_format="text", log_level="warning")
    with ServerThread(config) as server:
        yield server


def test_flop_count_of_the_benchmark_lstm():
    # 2 x (4*512*(256+512) + 4*512*(512+512) + 512*8000) multiply-adds
    assert models.lm_flops_per_token(models.BENCH_LMS["lstm"]) == 15_532_032
    assert models.lm_flops_per_token(models.BENCH_LMS["gru"]) == 13_697_024


def test_load_generator_against_a_real_server(tiny_bundle, seqserve_server, tmp_path):
    prompts = word_prompts(models.lm_words(models.TINY_LM), 4, count=4)
    # The server runs in this process: its CPU is this process's.
    server = ServerProcess("seqserve", SimpleNamespace(pid=os.getpid(), poll=lambda: 0), seqserve_server.port,
                           seqserve_server.app.metrics_port)
    spec = LoadSpec(tiny_bundle.name, concurrency=4, mix=("greedy", "sampling", "sessions"), prompts=prompts,
                    output_tokens=8, requests=8, duration=60)
    row, extra, notes = asyncio.run(serve.measure(server, spec))

    assert set(SUMMARY_COLUMNS) <= set(row)
    assert row["errors"] == 0, notes
    assert row["completed"] == 8 and row["tokens"] == 64
    assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0
    assert extra["steps"] > 0 and 1 <= extra["mean_rows"] <= 4 and extra["step_ms"] > 0

    point = serve.Point(tiny_bundle.name, "seqserve", 0, row, extra)
    args = Namespace(repeats=1)
    serve.write_outputs(tmp_path, args, [tiny_bundle], [point], {"numpy": 1e9},
                        {tiny_bundle.name: {1: 1e-4}}, None, "test machine", [])
    with (tmp_path / "results.csv").open() as handle:
        header = next(csv.reader(handle))
    assert {"model", "target", "tokens_per_s", "ttft_p50_ms", "itl_p99_ms", "mean_rows", "server_cpu"} <= set(header)
    table = (tmp_path / "results.md").read_text()
    assert "| streams | target | tok/s |" in table and "15.53" not in table


def test_null_baseline_speaks_the_same_rpc():
    from seqserve.v1 import service_pb2_grpc as pb_grpc

    async def scenario():
        import grpc

        from bench.baselines import NullServicer

        server = grpc.aio.server()
        pb_grpc.add_SeqserveServicer_to_server(NullServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await run_load(f"127.0.0.1:{port}", LoadSpec("any", 2, output_tokens=5, requests=4, duration=30))
        finally:
            await server.stop(0)

    summary = asyncio.run(scenario()).summary()
    assert summary["completed"] == 4 and summary["tokens"] == 20 and summary["tokens_per_message"] == 1.0


def test_sessions_are_skipped_with_a_note_when_not_served(seqserve_server, tiny_bundle):
    async def scenario():
        import grpc

        from seqserve.v1 import service_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{seqserve_server.port}") as channel:
            return await loadgen.sessions_supported(pb_grpc.SeqserveStub(channel), tiny_bundle.name)

    note = asyncio.run(scenario())
    assert note == "" or note.startswith("sessions skipped:")


def test_bare_decoder_step_times_beam_rows_of_real_sources(tiny_runs, tmp_path):
    """The beam check's floor: one bare decoder call on every source's row repeated beam_size times."""
    from bench.baselines import bare_decoder_step
    from exporters.bundle import ExportOptions, export_run
    from exporters.parity import ParitySettings

    options = ExportOptions(eval_limit=5, real_inputs=20,
                            parity=ParitySettings(greedy_inputs=2, beam_inputs=1, max_new_tokens=5))
    bundle = export_run(tiny_runs["lstm", "seq2seq"], tmp_path, "tiny-g2p", options=options).path
    one = bare_decoder_step(bundle, ["abc", "de"], 1, budget=0.05)
    five = bare_decoder_step(bundle, ["abc", "de"], 5, budget=0.05)
    assert 0 < one < 1 and 0 < five < 1
