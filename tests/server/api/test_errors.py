"""server/api/errors.py and status.py: every domain error becomes its status code with rich details; nothing crashes.

A throwaway servicer raises each error through a real grpc.aio server wrapped by StatusInterceptor.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server import errors
from server.api import errors as errors_module
from server.api.errors import StatusInterceptor
from server.api.status import status_of

RAISED = {
    "invalid": errors.InvalidArgument(field="options.top_p", value=1.5, allowed="in (0, 1]"),
    "not-found": errors.NotFound("unknown model 'x'"),
    "precondition": errors.FailedPrecondition("Translate needs a seq2seq model"),
    "exhausted": errors.ResourceExhausted("queue full"),
    "deadline": errors.DeadlineExceeded("deadline passed"),
    "unavailable": errors.Unavailable("draining"),
    "boom": RuntimeError("secret internals"),
}


class Raising(pb_grpc.SeqserveServicer):
    async def Translate(self, request, context):
        raise RAISED[request.model]

    closed: list[str] = []  # Generate calls whose generator was closed, by model

    async def Generate(self, request, context):
        if request.model == "endless":  # a stream the client leaves: the generator must be closed
            try:
                while True:
                    yield pb.GenerateResponse(chunk=pb.TokenChunk(text="x" * 4096))
            finally:
                Raising.closed.append(request.model)
        yield pb.GenerateResponse(chunk=pb.TokenChunk(text="first"))
        raise RAISED[request.model]

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelSummary(name=request.__class__.__name__)])


class Gate:
    def __init__(self):
        self.draining, self.active = False, 0

    def enter(self):
        if self.draining:
            raise errors.Unavailable("the server is draining")
        self.active += 1

    def exit(self):
        self.active -= 1


# The deadline of a call that must pass while the server holds it: long enough that the call surely reaches
# the server first, however loaded the machine (the test waits for the deadline, so no machine is too fast).
HELD_CALL_DEADLINE = 3.0


def serve_and_call(calls, *, token="", gate=None, observed_calls=0):
    """Run `calls(channel)` against a fresh server; return (its result, observed calls). With
    `observed_calls`, the server runs until it has observed that many (its side of a call may end after
    the client's)."""
    observed = []

    async def main():
        server = grpc.aio.server(interceptors=[StatusInterceptor(
            observe=lambda *call: observed.append(call), gate=gate, auth=token)])
        pb_grpc.add_SeqserveServicer_to_server(Raising(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                result = await calls(channel)
            while len(observed) < observed_calls:
                await asyncio.sleep(0.01)
            return result
        finally:
            await server.stop(None)

    return asyncio.run(main()), observed


async def _error_of(awaitable):
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")


@pytest.mark.parametrize(("model", "code"), [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT), ("not-found", grpc.StatusCode.NOT_FOUND),
    ("precondition", grpc.StatusCode.FAILED_PRECONDITION), ("exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED), ("unavailable", grpc.StatusCode.UNAVAILABLE),
    ("boom", grpc.StatusCode.INTERNAL),
])
def test_domain_errors_become_status_codes(model, code, caplog):
    async def calls(channel):
        return await _error_of(pb_grpc.SeqserveStub(channel).Translate(pb.TranslateRequest(model=model)))

    with caplog.at_level(logging.ERROR, logger="server.api.errors"):
        error, observed = serve_and_call(calls)
    assert error.code() == code
    assert observed[0][:3] == ("Translate", model, code.name)
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.domain == "seqserve.v1"
    if model == "boom":
        assert "secret internals" not in error.details() and "RuntimeError" in error.details()
        assert "secret internals" in caplog.text  # the log line has what the client is not told
    else:
        assert error.details() == str(RAISED[model])


def test_invalid_argument_carries_a_field_violation():
    async def calls(channel):
        return await _error_of(pb_grpc.SeqserveStub(channel).Translate(pb.TranslateRequest(model="invalid")))

    error, _ = serve_and_call(calls)
    assert error.details() == "options.top_p must be in (0, 1], got 1.5"
    status = rpc_status.from_call(error)
    bad_request, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad_request)
    (violation,) = bad_request.field_violations
    assert violation.field == "options.top_p" and "got 1.5" in violation.description
    assert dict(info.metadata) == {"field": "options.top_p", "value": "1.5", "allowed": "in (0, 1]"}


def test_error_after_streamed_chunks_still_ends_with_its_code():
    async def calls(channel):
        received = []
        call = pb_grpc.SeqserveStub(channel).Generate(pb.GenerateRequest(model="exhausted"))
        try:
            async for response in call:
                received.append(response.chunk.text)
        except grpc.aio.AioRpcError as error:
            return received, error.code()

    (received, code), observed = serve_and_call(calls)
    assert received == ["first"] and code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert observed[0][2] == "RESOURCE_EXHAUSTED"


def test_a_client_leaving_mid_stream_is_counted_once_as_cancelled():
    async def calls(channel):
        call = pb_grpc.SeqserveStub(channel).Generate(pb.GenerateRequest(model="endless"))
        await call.read()
        await asyncio.sleep(0.2)  # the server's writes wait on flow control
        call.cancel()
        for _ in range(500):
            if Raising.closed:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)

    Raising.closed.clear()
    gate = Gate()
    _, observed = serve_and_call(calls, gate=gate)
    assert [call[:3] for call in observed] == [("Generate", "endless", "CANCELLED")]
    assert Raising.closed == ["endless"] and gate.active == 0


def test_bad_utf8_is_invalid_argument_naming_the_field():
    good = pb.TranslateRequest(model="m", sources=["ok"]).SerializeToString()

    async def calls(channel):
        raw = channel.unary_unary("/seqserve.v1.Seqserve/Translate")
        top = await _error_of(raw(good + b"\x1a\x02\xff\xfe"))  # sources[1]
        nested = await _error_of(raw(good + b"\x22\x04\x62\x02\xc3\x28"))  # options.stop[0]
        garbage = await _error_of(raw(b"\x1a\x05ab"))  # truncated
        return top, nested, garbage

    (top, nested, garbage), observed = serve_and_call(calls)
    assert top.code() == nested.code() == garbage.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert top.details() == "sources[1] must be valid UTF-8, got the bytes b'\\xff\\xfe'"
    assert nested.details().startswith("options.stop[0] must be valid UTF-8")
    assert "not a valid seqserve.v1.TranslateRequest" in garbage.details()
    assert [call[2] for call in observed] == ["INVALID_ARGUMENT"] * 3


def test_bearer_token_when_auth_is_on():
    async def calls(channel):
        stub = pb_grpc.SeqserveStub(channel)
        missing = await _error_of(stub.ListModels(pb.ListModelsRequest()))
        wrong = await _error_of(stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", "Bearer x")]))
        ok = await stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", "Bearer t0k")])
        return missing, wrong, ok

    (missing, wrong, ok), _ = serve_and_call(calls, token="t0k")
    assert missing.code() == wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "none was given" in missing.details() and "wrong" in wrong.details()
    assert ok.models[0].name == "ListModelsRequest"


def test_gate_refuses_while_draining_and_counts_in_flight():
    gate = Gate()

    async def calls(channel):
        stub = pb_grpc.SeqserveStub(channel)
        await stub.ListModels(pb.ListModelsRequest())
        gate.draining = True
        return await _error_of(stub.ListModels(pb.ListModelsRequest()))

    error, _ = serve_and_call(calls, gate=gate)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "draining" in error.details()
    assert gate.active == 0


def test_request_id_comes_back_in_metadata():
    async def calls(channel):
        call = pb_grpc.SeqserveStub(channel).ListModels(pb.ListModelsRequest(),
                                                         metadata=[("x-request-id", "abc-1")])
        await call
        return dict(await call.initial_metadata())

    metadata, _ = serve_and_call(calls)
    assert metadata["x-request-id"] == "abc-1"


def test_status_of_unknown_error_hides_the_message():
    status = status_of(ValueError("private"))
    assert status.code == grpc.StatusCode.INTERNAL and "private" not in status.details


def test_unsafe_request_ids_are_replaced():
    async def calls(channel):
        call = pb_grpc.SeqserveStub(channel).ListModels(pb.ListModelsRequest(),
                                                         metadata=[("x-request-id", "a b {\"x\"}")])
        await call
        return dict(await call.initial_metadata())["x-request-id"]

    request_id, _ = serve_and_call(calls)
    assert request_id != "a b {\"x\"}" and len(request_id) == 16


def test_a_deadline_that_passes_before_the_call_starts_is_deadline_exceeded_not_internal(monkeypatch, caplog):
    # The race, made certain: the handler starts sending only after gRPC has ended the call on its deadline.
    begin = errors_module._Call.begin

    async def late_begin(call):
        try:
            while True:
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:  # gRPC ended the call: go on as if it had not yet noticed
            pass
        await begin(call)

    monkeypatch.setattr(errors_module._Call, "begin", late_begin)

    async def calls(channel):
        stub = pb_grpc.SeqserveStub(channel)
        errors = await asyncio.gather(
            _error_of(stub.ListModels(pb.ListModelsRequest(), timeout=HELD_CALL_DEADLINE)),
            _error_of(_drain(stub.Generate(pb.GenerateRequest(model="x"), timeout=HELD_CALL_DEADLINE))))
        return [error.code() for error in errors]

    with caplog.at_level(logging.INFO, logger="server.api.errors"):
        codes, observed = serve_and_call(calls, observed_calls=2)
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    assert [call[2] for call in observed] == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_a_call_ended_before_its_handler_starts_is_counted_once(monkeypatch):
    # gRPC accepted the call (the interceptor saw it), then the client's deadline ended it before the handler
    # ran: made certain here by holding every handler back until its call is over.
    wrap = StatusInterceptor._wrap_stream

    def held_back(self, rpc, behavior, arrival, streaming_request=False):
        wrapped = wrap(self, rpc, behavior, arrival, streaming_request)

        async def never_started(request, context):
            while not context.cancelled() and (context.time_remaining() or 1) > 0:
                await asyncio.sleep(0.005)
            # gRPC would not have started the handler at all: leave as if it never ran
            raise asyncio.CancelledError

        return never_started if behavior.__name__ == "Generate" else wrapped

    monkeypatch.setattr(StatusInterceptor, "_wrap_stream", held_back)

    async def calls(channel):
        stub = pb_grpc.SeqserveStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _drain(stub.Generate(pb.GenerateRequest(model="x"), timeout=HELD_CALL_DEADLINE))
        return caught.value.code()

    code, observed = serve_and_call(calls, observed_calls=1)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [call[:3] for call in observed] == [("Generate", "", "DEADLINE_EXCEEDED")]
