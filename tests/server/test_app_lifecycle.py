"""The server's life: a new version published under a running stream, and SIGTERM on `seqserve serve`.

Hot swap: the stream started on v1 goes on on v1 while new requests get v2. SIGTERM: health turns
NOT_SERVING, the in-flight stream completes, calls arriving meanwhile get UNAVAILABLE (never CANCELLED)
until the process exits, and it exits 0.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live import Reader, wait_for

from bench.services import ServeProcess
from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

SMALL_EXPORT = ExportOptions(eval_limit=20, real_inputs=100,
                             parity=ParitySettings(greedy_inputs=20, beam_inputs=6, max_new_tokens=20))
LONG_TOKENS = 2000  # a stream still decoding when the signal comes on most machines (it passes either way)
ENDLESS_TOKENS = 1_000_000  # no machine reaches it: only the test ends such a stream
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def lm_run(tiny_runs):
    return tiny_runs["lstm", "lm"]


def export(run, repository: Path, version: int) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export_run(run, repository, "tiny-lm", version, options=SMALL_EXPORT).path
    finally:
        torch.set_num_threads(before)


def long_request(tokens: int = LONG_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="tiny-lm", prompt="the", options=pb.DecodingOptions(
        max_new_tokens=tokens, min_new_tokens=tokens))


def test_hot_swap_keeps_in_flight_streams_on_their_version(lm_run, tmp_path):
    repository = tmp_path / "models"
    export(lm_run, repository, 1)
    staged = export(lm_run, tmp_path / "staging", 2)  # published below by one rename, as the exporter does
    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0.1,
                          max_new_tokens=ENDLESS_TOKENS, log_level="warning")
    with ServerThread(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SeqserveStub(channel)
        call = stub.Generate(long_request(ENDLESS_TOKENS))
        first = next(call)
        on_v1 = Reader(call)

        os.rename(staged, repository / "tiny-lm" / "2")

        def newest_version():
            done = list(stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="a")))[-1].done
            return done.version == 2

        wait_for(newest_version, what="version 2 to serve")
        # The v1 stream goes on decoding on v1 after the swap, until its client ends it.
        seen = len(on_v1.responses)
        wait_for(lambda: len(on_v1.responses) > seen + 10, what="the v1 stream to go on after the swap")
        assert not on_v1.finished.is_set()
        call.cancel()
        on_v1.join(timeout=60)
        assert on_v1.error.code() == grpc.StatusCode.CANCELLED
        assert all(r.HasField("chunk") for r in on_v1.responses) and first.chunk.token_ids

        (model,) = stub.ListModels(pb.ListModelsRequest()).models
        assert (list(model.versions), model.latest_version, model.ready) == ([1, 2], 2, True)
        assert stub.GetModel(pb.GetModelRequest(model="tiny-lm")).version == 2
        # v1 retires once its last stream is done.
        wait_for(lambda: [e.version for e in server.app.registry.engines()] == [2], what="v1 to retire")


def test_sigterm_drains_in_flight_streams_and_exits_zero(lm_run, tmp_path):
    repository = tmp_path / "models"
    export(lm_run, repository, 1)
    server = ServeProcess(repository, session_store="memory", env={"SEQSERVE_MAX_NEW_TOKENS": str(LONG_TOKENS)})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = Reader(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()))
            call = pb_grpc.SeqserveStub(channel).Generate(long_request())
            next(call)
            wait_for(lambda: watch.responses, what="the first health status")
            server.process.send_signal(signal.SIGTERM)
            in_flight = Reader(call)
            in_flight.join(timeout=60)
            watch.join(timeout=10)

        assert server.process.wait(timeout=60) == 0
        assert in_flight.error is None
        done = in_flight.responses[-1].done
        assert (done.generated_tokens, done.finish_reason) == (LONG_TOKENS, pb.FINISH_REASON_LENGTH)
        assert [r.status for r in watch.responses] == [SERVING, NOT_SERVING]
        events = server.events()
        names = [event.get("event") for event in events]
        assert names.index("serving") < names.index("draining") < names.index("stopped")
        assert next(e for e in events if e.get("event") == "stopped")["drained"] is True
    finally:
        server.kill()


def test_calls_arriving_while_the_server_drains_and_exits_get_unavailable(lm_run, tmp_path):
    # Clients keep calling through SIGTERM, the drain and the exit: each call is answered (OK) or refused
    # with UNAVAILABLE, which clients retry elsewhere; none is CANCELLED. An endless stream the test ends
    # itself holds the drain open, so calls certainly arrive during it, however fast the machine.
    repository = tmp_path / "models"
    export(lm_run, repository, 1)
    server = ServeProcess(repository, session_store="memory", env={"SEQSERVE_MAX_NEW_TOKENS": str(ENDLESS_TOKENS),
                                                                   "SEQSERVE_DRAIN_GRACE_SECONDS": "600"})
    codes: dict[str, int] = {}
    lock = threading.Lock()
    exited = threading.Event()

    def keep_calling():
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SeqserveStub(channel)
            while not exited.is_set():
                try:
                    list(stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="a", options=pb.DecodingOptions(
                        max_new_tokens=2)), timeout=30))
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1

    clients = [threading.Thread(target=keep_calling, daemon=True) for _ in range(8)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            held = pb_grpc.SeqserveStub(channel).Generate(long_request(ENDLESS_TOKENS))
            next(held)
            for client in clients:
                client.start()
            wait_for(lambda: codes.get("OK", 0) >= 20, what="calls to be answered")
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: codes.get("UNAVAILABLE", 0) >= 20, what="calls refused while draining")
            assert server.process.poll() is None  # still draining: the held stream is in flight
            held.cancel()  # the drain can end now
            assert server.process.wait(timeout=60) == 0
        refused_before_exit = codes.get("UNAVAILABLE", 0)
        wait_for(lambda: codes.get("UNAVAILABLE", 0) > refused_before_exit + 20, what="calls refused after the exit")
        exited.set()
        for client in clients:
            client.join(timeout=60)
    finally:
        exited.set()
        server.kill()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert "stopped" in [event.get("event") for event in server.events()]
