"""A real server under abuse: huge texts refused before they are tokenized while other streams go on,
temperature 0 as greedy everywhere, and a health check answering throughout."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from seqserve.v1 import service_pb2 as pb
from server.app import ServerThread
from server.config import ServerConfig

S = pb.DecodingOptions
ENDLESS_TOKENS = 1_000_000  # no machine reaches it: the test cancels the stream
HUGE = "the cat sat on the mat. " * 170_000  # 4.08 million characters, under the 4 MiB message limit


@pytest.fixture(scope="module")
def server(export_tiny_models, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    export_tiny_models(repository)
    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          max_input_tokens=64, max_new_tokens=ENDLESS_TOKENS, log_level="error")
    with ServerThread(config) as running:
        yield running


def rejection(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    return caught.value


def violated_field(error: grpc.RpcError) -> str:
    bad_request = error_details_pb2.BadRequest()
    for detail in rpc_status.from_call(error).details:
        if detail.Unpack(bad_request):
            return bad_request.field_violations[0].field
    return ""


def test_huge_texts_are_refused_by_length_before_tokenizing_while_other_streams_go_on(server, stub):
    assert len(HUGE.encode()) < 4 * 1024 * 1024
    session = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the")).session_id
    huge_calls = {
        "prompt": lambda: stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt=HUGE)),
        "sources[1]": lambda: stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=["abc", HUGE])),
        "source": lambda: stub.TranslateStream(pb.TranslateStreamRequest(model="tiny-g2p", source=HUGE)),
        "prefix": lambda: stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix=HUGE)),
        "text": lambda: stub.Feed(pb.FeedRequest(session_id=session, text=HUGE)),
    }
    running = stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=S(
        max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)))
    before = sum(len(next(running).chunk.token_ids) for _ in range(3))

    errors: dict[str, grpc.RpcError] = {}
    threads = [threading.Thread(target=lambda f=field, c=call: errors.__setitem__(f, rejection(c)))
               for field, call in [*huge_calls.items(), *huge_calls.items()]]  # ten at once
    for thread in threads:
        thread.start()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    for thread in threads:
        thread.join(timeout=60)

    for field, error in errors.items():
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        # Refused by its length in characters: the tokenizer never saw it.
        assert error.details().startswith(f"{field} must be at most ") and " characters long" in error.details()
        assert f"got {len(HUGE)} characters" in error.details() and violated_field(error) == field
        assert len(error.details()) < 300
    assert set(errors) == set(huge_calls)
    # The stream running meanwhile went on, and the session is untouched.
    after = sum(len(next(running).chunk.token_ids) for _ in range(3))
    running.cancel()
    assert before >= 3 and after >= 3
    assert stub.GetSession(pb.GetSessionRequest(session_id=session)).tokens_consumed == 3


def test_a_huge_blank_text_or_stop_string_is_not_echoed_back(stub):
    error = rejection(lambda: stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=[" " * 1_000_000])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
    assert error.details().startswith("sources[0] must be a non-empty text, got ' ")
    error = rejection(lambda: stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=S(
        stop=["x" * 1_000_000]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
    assert error.details() == "options.stop[0] must be at most 64 characters long, got 1000000 characters"


def test_an_over_long_model_name_is_invalid_argument(stub):
    error = rejection(lambda: stub.Generate(pb.GenerateRequest(model="m" * 100_000, prompt="the")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
    assert "model must be a model name of 1 to 255 characters" in error.details()


def test_temperature_zero_is_greedy_with_every_strategy(stub):
    def text(**options):
        responses = list(stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=S(
            max_new_tokens=12, **options))))
        return responses[-1].done.text

    greedy = text()
    for strategy in (S.STRATEGY_UNSPECIFIED, S.STRATEGY_GREEDY, S.STRATEGY_SAMPLE):
        assert text(strategy=strategy, temperature=0) == greedy
    beam = stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=["abc"], options=S(
        strategy=S.STRATEGY_BEAM, beam_size=3, n_best=2)))
    beam_cold = stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=["abc"], options=S(
        strategy=S.STRATEGY_BEAM, beam_size=3, n_best=2, temperature=0)))
    assert beam_cold.translations == beam.translations

