"""Converse: session operations for one or many sessions multiplexed over one bidirectional stream.

Every request runs as a task of its own, started in the order the requests arrive, so each operation
takes its place in its session's order on arrival (`server.sessions.ordering`): operations on one
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
from server.api.status import status_of
from server.errors import SeqserveError

logger = logging.getLogger(__name__)

MAX_PENDING = 256  # operations of one stream running at once; the stream reads no more until one ends

# run_operation(request) yields (field of ConverseResponse.result, message) answers of one request.
Operation = Callable[[pb.ConverseRequest], AsyncIterator[tuple[str, object]]]

_READER_DONE = object()
_TASK_DONE = object()


async def converse(requests: AsyncIterator[pb.ConverseRequest], run_operation: Operation
                   ) -> AsyncIterator[pb.ConverseResponse]:
    answers: asyncio.Queue = asyncio.Queue()
    room = asyncio.Semaphore(MAX_PENDING)
    running: set[asyncio.Task] = set()
    unfinished = 0  # operations started and not yet answered in full (counted here, not by `running`,
    # whose done-callbacks run a loop iteration after a task's last answer)

    async def run(request: pb.ConverseRequest, after: asyncio.Future | None, answered: asyncio.Future) -> None:
        nonlocal unfinished
        tag = request.request_tag

        async def answer(response: pb.ConverseResponse) -> None:
            # The session's earlier operations answer first, also when this one failed on entry.
            if after is not None and not after.done():
                await asyncio.shield(after)
            answers.put_nowait(response)

        try:
            async for field, message in run_operation(request):
                await answer(pb.ConverseResponse(request_tag=tag, **{field: message}))
        except Exception as error:  # noqa: BLE001 - answered, the stream goes on
            if not isinstance(error, SeqserveError) or error.code in ("INTERNAL", "UNKNOWN"):
                logger.error("Converse operation %s failed", request.WhichOneof("operation"), exc_info=error)
            await answer(pb.ConverseResponse(request_tag=tag, error=rpc_status(error)))
        finally:
            answered.set_result(None)
            room.release()
            unfinished -= 1
            answers.put_nowait(_TASK_DONE)

    async def read() -> None:
        nonlocal unfinished
        last_answer: dict[str, asyncio.Future] = {}  # session id -> done when its latest operation answered
        try:
            async for request in requests:
                await room.acquire()
                unfinished += 1
                session_id = _session_of(request)
                answered = asyncio.get_running_loop().create_future()
                after = last_answer.get(session_id) if session_id else None
                if session_id:
                    last_answer[session_id] = answered
                    answered.add_done_callback(lambda f, s=session_id: last_answer.get(s) is f and last_answer.pop(s))
                task = asyncio.create_task(run(request, after, answered), name=f"converse {request.request_tag}")
                running.add(task)
                task.add_done_callback(running.discard)
        except Exception as error:  # noqa: BLE001 - a request that did not parse ends the stream
            answers.put_nowait(error)
        finally:
            answers.put_nowait(_READER_DONE)

    reader = asyncio.create_task(read(), name="converse reader")
    reading = True
    try:
        while reading or unfinished:
            item = await answers.get()
            if item is _READER_DONE:
                reading = False
            elif isinstance(item, BaseException):
                raise item
            elif item is not _TASK_DONE:
                yield item
        while not answers.empty():  # answers queued by the last tasks to end
            item = answers.get_nowait()
            if isinstance(item, pb.ConverseResponse):
                yield item
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()


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
