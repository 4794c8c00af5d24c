"""The requests of one bidirectional stream, run side by side (Converse, the OIP's ModelStreamInfer).

Each request runs as a task of its own, started in the order the requests arrive, with at most
`MAX_PENDING` of them unanswered (the stream reads no more until one ends). The tasks' answers go out
in the order they are put. When the client half-closes, every answer still owed is sent, then the stream
ends; a request that cannot be read ends the stream with its error; when the client goes away (the
consumer stops iterating), the tasks still running are cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

R = TypeVar("R")
A = TypeVar("A")

MAX_PENDING = 256  # requests of one stream running at once

# What runs one request: given `put`, it puts the request's answers, in order.
Job = Callable[[Callable[[A], None]], Awaitable[None]]

_READER_DONE = object()
_TASK_DONE = object()


async def multiplex(requests: AsyncIterator[R], start: Callable[[R], Job], name: Callable[[R], str]
                    ) -> AsyncIterator[A]:
    """The answers of every request of `requests`; `start(request)` is called on arrival, in order, and its
    job then runs in a task named `name(request)`."""
    answers: asyncio.Queue = asyncio.Queue()
    room = asyncio.Semaphore(MAX_PENDING)
    running: set[asyncio.Task] = set()
    unfinished = 0  # requests started and not yet answered in full (counted here, not by `running`,
    # whose done-callbacks run a loop iteration after a task's last answer)

    async def run(job: Job) -> None:
        nonlocal unfinished
        try:
            await job(answers.put_nowait)
        finally:
            room.release()
            unfinished -= 1
            answers.put_nowait(_TASK_DONE)

    async def read() -> None:
        nonlocal unfinished
        try:
            async for request in requests:
                await room.acquire()
                unfinished += 1
                task = asyncio.create_task(run(start(request)), name=name(request))
                running.add(task)
                task.add_done_callback(running.discard)
        except Exception as error:  # noqa: BLE001 - a request that did not parse ends the stream
            answers.put_nowait(error)
        finally:
            answers.put_nowait(_READER_DONE)

    reader = asyncio.create_task(read(), name="stream reader")
    reading = True
    try:
        # Until the client half-closed, every task ended, and what they put was taken: the last tasks may
        # end (and put their answers) before the consumer has taken the reader's end.
        while reading or unfinished or not answers.empty():
            item = await answers.get()
            if item is _READER_DONE:
                reading = False
            elif isinstance(item, BaseException):
                raise item
            elif item is not _TASK_DONE:
                yield item
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
