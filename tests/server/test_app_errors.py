"""The README's error table (Serving > Errors), one test per row, against a real server on tiny bundles: each
situation gets its status code and a message naming the field, the value and what is allowed; none disturbs
other rows.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from exporters.bundle import ExportOptions
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

SMALL_EXPORT = ExportOptions(eval_limit=20, real_inputs=100,
                             parity=ParitySettings(greedy_inputs=20, beam_inputs=6, max_new_tokens=20))
S = pb.DecodingOptions
# One decode row and one queue place, so "queue full" takes two requests; small inputs and messages.
LIMITS = dict(max_rows_per_step=1, max_beam_size=1, default_beam_size=1, max_queue=1, max_input_tokens=32,
              max_new_tokens=100_000, max_receive_message_bytes=16 * 1024)
LONG = S(max_new_tokens=100_000, min_new_tokens=100_000)  # runs until cancelled


@pytest.fixture(scope="module")
def repository(export_tiny_models, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    export_tiny_models(repository, SMALL_EXPORT)
    # A bundle that cannot load: its manifest names another model.
    shutil.copytree(repository / "tiny-lm", repository / "broken-lm")
    return repository


def config(repository, **changes) -> ServerConfig:
    return ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                        log_level="error", **{**LIMITS, **changes})


@pytest.fixture(scope="module")
def server(repository):
    with ServerThread(config(repository)) as running:
        yield running


def error_of(call, *args, **kwargs) -> grpc.RpcError:
    """The error a unary call or a whole stream ends with."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if not isinstance(result, pb.TranslateResponse | pb.ModelInfo | pb.ListModelsResponse):
            list(result)
    return caught.value


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    bad_request = error_details_pb2.BadRequest()
    for detail in rpc_status.from_call(error).details:
        if detail.Unpack(bad_request):
            return [(v.field, v.description) for v in bad_request.field_violations]
    return []


def load(server, name: str) -> tuple[float, float]:
    """(rows in use, requests queued) of a model, from the engine's gauges. No rows in use means no request
    is decoding: each holds one or more."""
    value = server.app.metrics.registry.get_sample_value
    return value("seqserve_active_rows", {"model": name}), value("seqserve_queue_depth", {"model": name})


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- INVALID_ARGUMENT ------------------------------------------------------------------------------------

def test_bad_parameter_is_invalid_argument(stub):
    error = error_of(stub.Translate, pb.TranslateRequest(model="tiny-g2p", sources=["abc"],
                                                         options=S(strategy=S.STRATEGY_SAMPLE, top_p=1.5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "options.top_p must be in (0, 1], got 1.5"
    assert field_violations(error) == [("options.top_p", "options.top_p must be in (0, 1], got 1.5")]
    error = error_of(stub.Generate, pb.GenerateRequest(model="tiny-lm", options=S(max_new_tokens=100_001)))
    assert error.details() == "options.max_new_tokens must be in [1, 100000], got 100001"


def test_empty_input_is_invalid_argument(stub):
    for call, request, message in (
            (stub.Translate, pb.TranslateRequest(model="tiny-g2p", sources=["abc", ""]),
             "sources[1] must be a non-empty text, got ''"),
            (stub.Translate, pb.TranslateRequest(model="tiny-g2p"), "sources must be a list of 1 or more source texts"),
            (stub.TranslateStream, pb.TranslateStreamRequest(model="tiny-g2p", source=" "),
             "source must be a non-empty text, got ' '")):
        error = error_of(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(message)


def test_over_long_input_is_invalid_argument(stub):
    error = error_of(stub.Translate, pb.TranslateRequest(model="tiny-g2p", sources=["ab", "a" * 40]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "sources[1] must be at most 32 tokens long, got 40 tokens"
    assert field_violations(error)[0][0] == "sources[1]"
    error = error_of(stub.Generate, pb.GenerateRequest(model="tiny-lm", prompt="the cat " * 5))
    assert error.details() == "prompt must be at most 32 tokens long, got 40 tokens"


def test_bad_utf8_is_invalid_argument_and_disturbs_no_one(server, stub):
    good = list(stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=S(max_new_tokens=300))))
    running = stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=S(max_new_tokens=300)))
    first = next(running)  # decoding while the bad requests arrive
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary("/seqserve.v1.Seqserve/Translate")
        error = error_of(raw, pb.TranslateRequest(model="tiny-g2p", sources=["ab"]).SerializeToString()
                         + b"\x1a\x03a\xffb")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "sources[1] must be valid UTF-8, got the bytes b'a\\xffb'"
        raw_stream = channel.unary_stream("/seqserve.v1.Seqserve/Generate")
        error = error_of(raw_stream, b"\x0a\x07tiny-lm\x1a\x02\xc3\x28")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("prompt must be valid")
    rest = list(running)
    streamed = [first, *rest[:-1]]
    assert [t for r in good[:-1] for t in r.chunk.token_ids] == [t for r in streamed for t in r.chunk.token_ids]
    assert rest[-1].done == good[-1].done


# --- NOT_FOUND, FAILED_PRECONDITION -----------------------------------------------------------------------

def test_unknown_model_or_version_is_not_found(stub):
    error = error_of(stub.Translate, pb.TranslateRequest(model="nope", sources=["abc"]))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in error.details()
    error = error_of(stub.Generate, pb.GenerateRequest(model="tiny-lm", version=7))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error.details() == "model 'tiny-lm' has no version 7; it has 1"
    error = error_of(stub.GetModel, pb.GetModelRequest(model="tiny-lm", version=7))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_an_rpc_the_model_kind_does_not_serve_is_failed_precondition(stub):
    error = error_of(stub.Translate, pb.TranslateRequest(model="tiny-lm", sources=["abc"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "Translate needs a seq2seq model; tiny-lm v1 is a language model (use Generate)"
    error = error_of(stub.Generate, pb.GenerateRequest(model="tiny-g2p", prompt="abc"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "(use Translate)" in error.details()


# --- RESOURCE_EXHAUSTED ------------------------------------------------------------------------------------

def test_full_queue_is_resource_exhausted(server, stub):
    active = stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="a", options=LONG))
    next(active)  # holds the only row
    queued = stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="b", options=LONG))
    wait_for(lambda: load(server, "tiny-lm")[1] == 1)
    try:
        error = error_of(stub.Generate, pb.GenerateRequest(model="tiny-lm", prompt="c"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        active.cancel()
        queued.cancel()
    wait_for(lambda: load(server, "tiny-lm") == (0, 0))


def test_message_too_large_is_resource_exhausted(stub):
    error = error_of(stub.Translate, pb.TranslateRequest(model="tiny-g2p", sources=["a" * 20_000]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- DEADLINE_EXCEEDED --------------------------------------------------------------------------------------

def test_passed_deadline_is_deadline_exceeded_and_frees_the_row(server, stub):
    error = error_of(stub.Generate, pb.GenerateRequest(model="tiny-lm", prompt="a", options=LONG), timeout=0.3)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: load(server, "tiny-lm")[0] == 0)


# --- UNAVAILABLE ----------------------------------------------------------------------------------------------

def test_a_model_that_is_not_loaded_is_unavailable(stub):
    error = error_of(stub.Generate, pb.GenerateRequest(model="broken-lm", prompt="a"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("model broken-lm is not loaded: ")
    listed = {m.name: m.ready for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert listed == {"broken-lm": False, "tiny-g2p": True, "tiny-lm": True}


def test_draining_server_is_unavailable_and_finishes_in_flight_work(repository):
    with ServerThread(config(repository, max_rows_per_step=4)) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub, health = pb_grpc.SeqserveStub(channel), health_pb2_grpc.HealthStub(channel)
        in_flight = stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="a", options=S(
            max_new_tokens=600, min_new_tokens=600)))
        next(in_flight)
        drained = asyncio.run_coroutine_threadsafe(server.app.drain(30.0), server.loop)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest()).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING)
        error = error_of(stub.Generate, pb.GenerateRequest(model="tiny-lm", prompt="b"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
        rest = list(in_flight)
        assert rest[-1].done.generated_tokens == 600 and rest[-1].done.finish_reason == pb.FINISH_REASON_LENGTH
        drained.result(timeout=30)


# --- UNAUTHENTICATED ---------------------------------------------------------------------------------------

def test_missing_or_wrong_token_is_unauthenticated(repository):
    with ServerThread(config(repository, auth_token="s3cret")) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SeqserveStub(channel)
        request = pb.TranslateRequest(model="tiny-g2p", sources=["abc"])
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            error = error_of(stub.Translate, request, metadata=metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in error.details()
        assert stub.Translate(request, metadata=(("authorization", "Bearer s3cret"),)).translations
        # Probes need no token.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
