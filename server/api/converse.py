"""Converse: session operations for one or many sessions multiplexed over one bidirectional stream.

Every request runs as a task of its own (`multiplex`), started in the order the requests arrive, so each
operation takes its place in its session's order on arrival (`server.sessions.ordering`): operations on one
session are applied, and answered, in the order they were sent (a get waits for a generation sent
before it; an operation refused on entry is answered after the ones before it); operations on
different sessions run side by side and their answers interleave, each tagged with its request_tag. A failed
operation is answered with `.error` (the google.rpc.Status its unary RPC would have ended with) and
the stream goes on. When the client half-closes, the answers still owed are sent, then the stream
ends; when it goes away, the operations still running are cancelled (a generation keeps, in its
session, the tokens generated until then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from google.rpc import status_pb2

from seqserve.v1 import service_pb2 as pb
from server.api.multiplex import multiplex
from server.api.status import status_of
from server.errors import SeqserveError

logger = logging.getLogger(__name__)

# run_operation(request) yields (field of ConverseResponse.result, message) answers of one request.
Operation = Callable[[pb.ConverseRequest], AsyncIterator[tuple[str, object]]]


def converse(requests: AsyncIterator[pb.ConverseRequest], run_operation: Operation
             ) -> AsyncIterator[pb.ConverseResponse]:
    last_answer: dict[str, asyncio.Future] = {}  # session id -> done when its latest operation answered

    def start(request: pb.ConverseRequest):
        # On arrival, in order: the operation answers after the one before it on its session.
        session_id = _session_of(request)
        answered = asyncio.get_running_loop().create_future()
        after = last_answer.get(session_id) if session_id else None
        if session_id:
            last_answer[session_id] = answered
            answered.add_done_callback(lambda f, s=session_id: last_answer.get(s) is f and last_answer.pop(s))
        return lambda put: _answer(request, run_operation, after, answered, put)

    return multiplex(requests, start, lambda request: f"converse {request.request_tag}")


async def _answer(request: pb.ConverseRequest, run_operation: Operation, after: asyncio.Future | None,
                  answered: asyncio.Future, put: Callable[[pb.ConverseResponse], None]) -> None:
    tag = request.request_tag

    async def answer(response: pb.ConverseResponse) -> None:
        # The session's earlier operations answer first, also when this one failed on entry.
        if after is not None and not after.done():
            await asyncio.shield(after)
        put(response)

    try:
        async for field, message in run_operation(request):
            await answer(pb.ConverseResponse(request_tag=tag, **{field: message}))
    except Exception as error:  # noqa: BLE001 - answered, the stream goes on
        if not isinstance(error, SeqserveError) or error.code in ("INTERNAL", "UNKNOWN"):
            logger.error("Converse operation %s failed", request.WhichOneof("operation"), exc_info=error)
        await answer(pb.ConverseResponse(request_tag=tag, error=rpc_status(error)))
    finally:
        answered.set_result(None)


def _session_of(request: pb.ConverseRequest) -> str:
    """The session an operation is on ("" for create_session, or none)."""
    operation = request.WhichOneof("operation")
    return getattr(getattr(request, operation), "session_id", "") if operation else ""


def rpc_status(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status (code, message, details) a unary call failing with `error` ends with."""
    status = status_of(error)
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=status.code.value[0], message=status.details)
