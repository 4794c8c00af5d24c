"""Property-based fuzzing of a real server (hypothesis): random decoding options, texts, model names and
session operations. Whatever comes in, the answer is never INTERNAL or UNKNOWN, every INVALID_ARGUMENT
names its field, and afterwards the server answers a fixed request exactly as it did before.

Bounded to about 30 seconds on this repository's 2-core CI machine (`max_examples` below).
"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqserve.v1 import service_pb2 as pb
from server.app import ServerThread
from server.config import ServerConfig

S = pb.DecodingOptions
INT32 = st.integers(-(2**31), 2**31 - 1)
SMALL = st.integers(-3, 40)
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXTS = st.text(max_size=40) | st.sampled_from(["", " ", "the cat", "abc", "\x00", "é\u0301", "🙂" * 3])
NAMES = st.sampled_from(["tiny-lm", "tiny-g2p", "", "nope", "../tiny-lm", "tiny-lm\n"]) | st.text(max_size=20)
FIXED = pb.GenerateRequest(model="tiny-lm", prompt="the cat", options=S(max_new_tokens=20, min_new_tokens=20))


@st.composite
def options(draw) -> pb.DecodingOptions:
    message = S(strategy=draw(st.integers(0, 4)) if draw(st.booleans()) else draw(st.sampled_from([0, 1, 2, 3])),
                max_new_tokens=draw(SMALL | INT32), min_new_tokens=draw(SMALL | INT32),
                top_k=draw(SMALL), beam_size=draw(st.integers(-2, 6) | INT32), n_best=draw(st.integers(-1, 5)),
                early_stopping=draw(st.booleans()), stop=draw(st.lists(TEXTS, max_size=3)),
                no_repeat_ngram_size=draw(st.integers(-1, 40)), return_log_probs=draw(st.booleans()),
                top_log_probs=draw(st.integers(-1, 25)))
    for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(message, name, draw(FLOATS | st.sampled_from([0.0, 0.5, 1.0, 2.0])))
    if draw(st.booleans()):
        message.seed = draw(st.integers(0, 2**64 - 1))
    return message


def session_ids(created: list[str]):
    return st.sampled_from(created) if created else st.text(max_size=40)


@pytest.fixture(scope="module")
def server(export_tiny_models, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    export_tiny_models(repository)
    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          max_new_tokens=40, default_max_new_tokens=16, max_input_tokens=64, max_beam_size=4,
                          default_beam_size=2, max_sessions=20, log_level="error")
    with ServerThread(config) as running:
        yield running


def answer(call, request) -> grpc.StatusCode:
    """Call and drain; the status code the call ended with."""
    try:
        result = call(request, timeout=30)
        if not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as error:
        check(error)
        return error.code()
    return grpc.StatusCode.OK


def check(error: grpc.RpcError) -> None:
    assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        bad_request = error_details_pb2.BadRequest()
        fields = [v.field for d in rpc_status.from_call(error).details if d.Unpack(bad_request)
                  for v in bad_request.field_violations]
        assert fields and fields[0] and fields[0].split("[")[0].split(".")[0] in error.details(), error.details()


def fixed_answer(stub) -> tuple[list[int], str]:
    """The fixed request's tokens and final text (how they were split into chunks depends on timing)."""
    responses = list(stub.Generate(FIXED, timeout=30))
    return [t for r in responses[:-1] for t in r.chunk.token_ids], responses[-1].done.text


@pytest.fixture(scope="module")
def reference(stub):
    return fixed_answer(stub)


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(model=NAMES, prompt=TEXTS, opts=options(), version=st.integers(-2, 3) | INT32)
def test_random_generations_and_translations_are_answered_or_refused_by_field(stub, reference, model, prompt, opts,
                                                                             version):
    answer(stub.Generate, pb.GenerateRequest(model=model, version=version, prompt=prompt, options=opts))
    answer(stub.Translate, pb.TranslateRequest(model=model, version=version, sources=[prompt, "abc"], options=opts))
    answer(stub.TranslateStream, pb.TranslateStreamRequest(model=model, source=prompt, options=opts))
    answer(stub.GetModel, pb.GetModelRequest(model=model, version=version))


@FUZZ
@given(data=st.data())
def test_random_session_operations_are_answered_or_refused_by_field(stub, data):
    created: list[str] = []
    for _ in range(6):
        operation = data.draw(st.sampled_from(["create", "feed", "generate", "fork", "get", "close"]))
        session_id = data.draw(session_ids(created))
        if operation == "create":
            try:
                session = stub.CreateSession(pb.CreateSessionRequest(
                    model=data.draw(NAMES), prefix=data.draw(TEXTS),
                    ttl_seconds=data.draw(st.integers(-5, 100) | INT32)), timeout=30)
                created.append(session.session_id)
            except grpc.RpcError as error:
                check(error)
        elif operation == "feed":
            answer(stub.Feed, pb.FeedRequest(session_id=session_id, text=data.draw(TEXTS),
                                             return_log_probs=data.draw(st.booleans())))
        elif operation == "generate":
            answer(stub.GenerateInSession, pb.GenerateInSessionRequest(session_id=session_id,
                                                                       options=data.draw(options())))
        elif operation == "fork":
            answer(stub.ForkSession, pb.ForkSessionRequest(session_id=session_id,
                                                           ttl_seconds=data.draw(st.integers(-5, 100))))
        elif operation == "get":
            answer(stub.GetSession, pb.GetSessionRequest(session_id=session_id))
        else:
            answer(stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
    for session_id in created:
        answer(stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))


def test_the_server_answers_as_before_after_the_fuzzing(stub, reference):
    assert fixed_answer(stub) == reference
