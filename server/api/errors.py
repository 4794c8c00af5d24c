"""The edge of every Seqserve call: domain errors -> gRPC status with rich details, and per-call bookkeeping.

`StatusInterceptor` wraps every `seqserve.v1.Seqserve` method so the servicer only raises domain errors
(`server.errors`): it maps them to status codes per the design's §4 with `google.rpc` details (BadRequest
field violations and ErrorInfo naming field, value and allowed range), turns anything unexpected into
INTERNAL with one log line (the server never crashes on a request), refuses undecodable requests (bad
UTF-8 in a string field) with INVALID_ARGUMENT naming the field, checks the optional bearer token, gives
each call a request id, and counts the call once with its final code.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.api.auth import BearerTokens
from server.errors import (
    DEADLINE_SLACK_SECONDS,
    InvalidArgument,
    ResourceExhausted,
    SeqserveError,
    Unauthenticated,
    Unavailable,
    shown,
)

logger = logging.getLogger(__name__)

SERVICE = "seqserve.v1.Seqserve"
INFERENCE_SERVICE = "inference.GRPCInferenceService"  # the Open Inference Protocol, served alike
ERROR_DOMAIN = "seqserve.v1"
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
# The request id of the call being served, for log lines (app.py's log filter reads it).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Observer of finished calls: (rpc, model, code name, seconds).
CallObserver = Callable[[str, str, str, float], None]


def status_of(error: BaseException) -> grpc.Status:
    """The gRPC status (code, message, `grpc-status-details-bin` trailer) a domain error is answered with."""
    if isinstance(error, SeqserveError):
        code_name, message = error.code, error.message
    else:
        code_name, message = "INTERNAL", f"internal error ({type(error).__name__}); see the server log"
    details = [error_details_pb2.ErrorInfo(reason=_reason(error), domain=ERROR_DOMAIN,
                                           metadata=_error_metadata(error))]
    if isinstance(error, InvalidArgument):
        details.append(error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
            field=error.field or "", description=message, reason=_reason(error))]))
    if isinstance(error, (Unavailable, ResourceExhausted)):
        # Both pass: the queue drains, the model finishes loading, another replica takes over.
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)))
    status = status_pb2.Status(code=getattr(code_pb2, code_name), message=message,
                               details=[_pack(detail) for detail in details])
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the call with the status of `error` (raises, as `context.abort` does)."""
    status = status_of(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass(frozen=True)
class Undecodable:
    """What the safe deserializer hands on in place of a request that failed to parse."""

    error: InvalidArgument


def decode_error(descriptor: Descriptor | None, data: bytes, error: Exception) -> InvalidArgument:
    """An InvalidArgument for bytes that do not parse as `descriptor`: names the bad UTF-8 field if any."""
    if descriptor is not None:
        found = find_invalid_utf8(descriptor, data)
        if found is not None:
            path, raw = found
            return InvalidArgument(f"{path} must be valid UTF-8, got the bytes {raw[:32]!r}",
                                   field=path, value=raw[:32], allowed="valid UTF-8")
    name = descriptor.full_name if descriptor is not None else "request"
    return InvalidArgument(f"the request is not a valid {name}: {error}")


def find_invalid_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> tuple[str, bytes] | None:
    """(field path, raw bytes) of the first string field of `data` that is not UTF-8, else None.

    gRPC only says the message did not parse; walking the wire format once more (on the error path
    only) lets the message name the field, e.g. "sources[1]".
    """
    counts: dict[int, int] = {}
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type == 1:
                position += 8
            elif wire_type == 5:
                position += 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                chunk, position = data[position:position + length], position + length
                found = _check_field(descriptor.fields_by_number.get(number), chunk, counts, number, prefix)
                if found is not None:
                    return found
            else:
                return None  # groups are not used by proto3; anything else is noise
    except IndexError:
        return None
    return None


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every Seqserve method (health and reflection pass through untouched).

    `gate`, when given, has `enter()` (raises Unavailable while draining) and `exit()`, so the app can
    refuse new calls and wait for in-flight ones. `auth` (a `BearerTokens`, or one token), when it holds
    any token, requires "authorization: Bearer <one of them>".
    """

    def __init__(self, observe: CallObserver | None = None, gate: Any = None, auth: BearerTokens | str = ""):
        self._observe = observe or (lambda *args: None)
        self._gate = gate
        self._auth = auth if isinstance(auth, BearerTokens) else BearerTokens(auth)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.split("/")[1:2] not in ([SERVICE], [INFERENCE_SERVICE]):
            return handler
        rpc = method.rsplit("/", 1)[1]
        deserializer = _safe_deserializer(handler.request_deserializer)
        serializer = handler.response_serializer
        arrival = _Arrival(self, rpc)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(rpc, handler.unary_unary, arrival), deserializer, serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(rpc, handler.unary_stream, arrival), deserializer, serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(rpc, handler.stream_unary, arrival, streaming_request=True), deserializer,
                serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(rpc, handler.stream_stream, arrival, streaming_request=True), deserializer, serializer)

    def _wrap_unary(self, rpc: str, behavior, arrival: _Arrival, streaming_request: bool = False):
        async def unary(request, context):
            arrival.started = True
            call = _Call(self, rpc, request, context, streaming_request)
            try:
                await call.begin()
                response = await behavior(call.request, context)
            except BaseException as error:  # noqa: B036 - cancellation is recorded, then re-raised
                await call.fail(error)
            else:
                call.finish("OK")
                return response

        return unary

    def _wrap_stream(self, rpc: str, behavior, arrival: _Arrival, streaming_request: bool = False):
        # A coroutine that writes each response itself (grpc.aio's reader/writer form) rather than an async
        # generator that grpc iterates: one generator frame less to resume for every streamed message.
        async def stream(request, context):
            arrival.started = True
            call = _Call(self, rpc, request, context, streaming_request)
            responses = None
            writing = False
            try:
                await call.begin()
                responses = behavior(call.request, context)
                write = context.write
                async for response in responses:
                    writing = True
                    await write(response)
                    writing = False
            except BaseException as error:  # noqa: B036 - cancellation is recorded, then re-raised
                if writing:  # grpc could not send: the client left, or the call is over
                    call.left()
                    raise
                await call.fail(error)
            else:
                call.finish("OK")
            finally:
                if responses is not None:
                    await responses.aclose()  # a no-op once it ended; else its cleanup runs now

        return stream


class _Arrival:
    """A call gRPC accepted. One that its client ends before gRPC starts our handler never reaches `_Call`: it
    is counted here when gRPC lets go of its handler, so every call that arrived is counted exactly once. It
    counts as DEADLINE_EXCEEDED: the server cannot tell a passed deadline from a cancellation (both reach
    it as a reset stream), and a call ended before its request was even read is almost always one whose
    deadline was shorter than the queue in front of it."""

    __slots__ = ("owner", "rpc", "arrived", "started")

    def __init__(self, owner: StatusInterceptor, rpc: str):
        self.owner, self.rpc, self.arrived, self.started = owner, rpc, time.perf_counter(), False

    def __del__(self):
        if self.started:
            return
        try:
            self.owner._observe(self.rpc, "", "DEADLINE_EXCEEDED", time.perf_counter() - self.arrived)
        except Exception:  # noqa: S110 - nothing may escape a finaliser
            pass


class _Call:
    """One call's bookkeeping: request id, gate, auth, and exactly one observation of its outcome."""

    def __init__(self, owner: StatusInterceptor, rpc: str, request, context, streaming_request: bool):
        self.owner, self.rpc, self.context = owner, rpc, context
        self.request = _checked_stream(request) if streaming_request else request
        self.model = "" if streaming_request else getattr(request, "model", "") or getattr(request, "model_name", "")
        self.started = time.perf_counter()
        self.entered = False
        metadata = dict(context.invocation_metadata() or ())
        self.metadata = metadata
        given = getattr(request, "request_id", "") if not streaming_request else ""
        self.request_id = _clean_id(given) or _clean_id(metadata.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex[:16]
        request_id_var.set(self.request_id)

    async def begin(self) -> None:
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.request_id),))
        if isinstance(self.request, Undecodable):
            raise self.request.error
        auth = self.owner._auth
        if auth.enabled:
            presented = self.metadata.get("authorization")
            scheme, _, token = (presented or "").partition(" ")
            if scheme != "Bearer" or not auth.accepts(token):
                raise Unauthenticated("this server needs the metadata 'authorization: Bearer <token>'; "
                                      + ("the token given is wrong" if presented is not None else "none was given"))
        if self.owner._gate is not None:
            self.owner._gate.enter()
            self.entered = True

    async def fail(self, error: BaseException) -> None:
        if isinstance(error, grpc.aio.AbortError):
            self.finish(_code_name(self.context.code()))
            raise error  # the behavior aborted with its own status already
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.left()
            raise error
        if self.is_over():
            # gRPC ended the call under us (deadline, client gone): the client has its status already, and
            # an error from sending on the ended call is no fault of ours.
            self.left()
            raise asyncio.CancelledError(f"{self.rpc} ended before it was answered") from error
        if not isinstance(error, SeqserveError):
            logger.error("%s failed unexpectedly (request id %s)", self.rpc, self.request_id, exc_info=error)
        elif error.code in ("INTERNAL", "UNKNOWN"):
            logger.error("%s failed: %s (request id %s)", self.rpc, error, self.request_id)
        code = error.code if isinstance(error, SeqserveError) else "INTERNAL"
        self.finish(code)
        await abort(self.context, error)

    def is_over(self) -> bool:
        """The call already ended on gRPC's side (cancelled, or past its deadline)."""
        remaining = self.context.time_remaining()
        return self.context.cancelled() or self.context.done() or (remaining is not None and remaining <= 0)

    def left(self) -> None:
        """The call ended under the handler (client gone, deadline passed; a client whose cancellation
        arrives within DEADLINE_SLACK_SECONDS of its deadline left because of it)."""
        remaining = self.context.time_remaining()
        past = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
        self.finish("DEADLINE_EXCEEDED" if past else "CANCELLED")

    def finish(self, code: str) -> None:
        if self.entered:
            self.entered = False
            self.owner._gate.exit()
        seconds = time.perf_counter() - self.started
        try:
            self.owner._observe(self.rpc, self.model, code, seconds)
        except Exception:  # a broken metric must not turn an answered call into a failure
            logger.exception("recording metrics of %s failed", self.rpc)
        logger.info("%s %s in %.1f ms", self.rpc, code, seconds * 1000,
                    extra={"rpc": self.rpc, "code": code, "model": self.model,
                           "duration_ms": round(seconds * 1000, 3)})


def _clean_id(value) -> str:
    """A client's request id if it is safe to log as is (no newlines or control bytes), else ""."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    return ""


def _safe_deserializer(deserializer):
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError; the walk below says which field
            return Undecodable(decode_error(descriptor, data, error))

    return deserialize


async def _checked_stream(requests):
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request


def _check_field(field: FieldDescriptor | None, chunk: bytes, counts: dict[int, int], number: int,
                 prefix: str) -> tuple[str, bytes] | None:
    if field is None or field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
        return None
    path = prefix + field.name
    if field.is_repeated:
        path += f"[{counts.get(number, 0)}]"
        counts[number] = counts.get(number, 0) + 1
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return find_invalid_utf8(field.message_type, chunk, path + ".")
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return path, chunk
    return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _reason(error: BaseException) -> str:
    code = error.code if isinstance(error, SeqserveError) else "INTERNAL"
    if isinstance(error, InvalidArgument) and error.field is not None:
        return "INVALID_FIELD"
    return code


def _error_metadata(error: BaseException) -> dict[str, str]:
    if not isinstance(error, InvalidArgument) or error.field is None:
        return {}
    return {"field": error.field, "value": shown(error.value), "allowed": error.allowed or ""}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _code_name(code: grpc.StatusCode | None) -> str:
    return code.name if code is not None else "UNKNOWN"
