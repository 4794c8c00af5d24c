"""The edge of every Seqserve call: the interceptor and its per-call bookkeeping.

`StatusInterceptor` wraps every `seqserve.v1.Seqserve` method so the servicer only raises domain errors
(`server.errors`): it answers them with their status (`server.api.status.status_of`), turns anything
unexpected into INTERNAL with one log line (the server never crashes on a request), refuses undecodable
requests (bad UTF-8 in a string field, found by `server.api.wire`) with INVALID_ARGUMENT naming the
field, checks the optional bearer token, gives each call a request id, and counts the call once with its
final code.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from server.api.auth import BearerTokens
from server.api.status import abort
from server.api.wire import Undecodable, checked_stream, safe_deserializer
from server.errors import DEADLINE_SLACK_SECONDS, SeqserveError, Unauthenticated

logger = logging.getLogger(__name__)

SERVICE = "seqserve.v1.Seqserve"
INFERENCE_SERVICE = "inference.GRPCInferenceService"  # the Open Inference Protocol, served alike
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
# The request id of the call being served, for log lines (app.py's log filter reads it).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Observer of finished calls: (rpc, model, code name, seconds).
CallObserver = Callable[[str, str, str, float], None]


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every Seqserve method (health and reflection pass through untouched).

    `gate`, when given, has `enter()` (raises Unavailable while draining) and `exit()` (once gRPC has sent
    the call's status), so the app can refuse new calls and wait for in-flight ones. `auth` (a
    `BearerTokens`, or one token), when it holds any token, requires "authorization: Bearer <one of them>".
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
        deserializer = safe_deserializer(handler.request_deserializer)
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
        self.request = checked_stream(request) if streaming_request else request
        self.model = "" if streaming_request else getattr(request, "model", "") or getattr(request, "model_name", "")
        self.started = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        self.metadata = metadata
        given = getattr(request, "request_id", "") if not streaming_request else ""
        self.request_id = _clean_id(given) or _clean_id(metadata.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex[:16]
        request_id_var.set(self.request_id)

    async def begin(self) -> None:
        try:
            await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.request_id),))
        except Exception as error:  # gRPC can send nothing on this call: it ended (deadline, client gone)
            raise asyncio.CancelledError(f"{self.rpc} ended before it began") from error
        if isinstance(self.request, Undecodable):
            raise self.request.error
        auth = self.owner._auth
        if auth.enabled:
            presented = self.metadata.get("authorization")
            scheme, _, token = (presented or "").partition(" ")
            if scheme != "Bearer" or not auth.accepts(token):
                raise Unauthenticated("this server needs the metadata 'authorization: Bearer <token>'; "
                                      + ("the token given is wrong" if presented is not None else "none was given"))
        gate = self.owner._gate
        if gate is not None:
            gate.enter()
            # In flight until gRPC has sent the status, not until the handler returns: the last messages of a
            # stream may still wait on the client's flow-control window, and a drained process exits next.
            self.context.add_done_callback(lambda _context: gate.exit())

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


def _code_name(code: grpc.StatusCode | None) -> str:
    return code.name if code is not None else "UNKNOWN"
