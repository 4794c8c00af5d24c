"""A generation inside a session: the engine's events for the caller, the session parked at the end.

The work runs in a task of its own, not in the caller's: a client that cancels or disconnects only
cancels the engine request, and the task still receives the engine's partial finish event and parks
what was generated before the cancellation (see `SessionManager.park`). The session's turn is
released only once the caller has taken the finish event (or gone), so the answer to a generation
always precedes the answers to the operations queued behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from server.decoding import DecodingParams, FinishReason
from server.decoding.hypothesis import Hypothesis
from server.engine.requests import FinishEvent, GenerationRequest, RequestStream, TokenEvent
from server.sessions.ordering import Turn
from server.sessions.port import SessionEngine
from server.sessions.record import SessionRecord

T = TypeVar("T")


class SessionHost(Protocol):
    """What a generation needs of the sessions it runs in (`SessionManager` is one): the session's record,
    a call on its engine, and parking the finished generation. Declared here, so this module never
    imports the manager (which creates generations) and the two do not import each other."""

    async def record_of(self, session_id: str, cached: bool = False) -> SessionRecord: ...

    async def on_engine(self, record: SessionRecord, call: Callable[[SessionEngine], Awaitable[T] | T]
                        ) -> tuple[SessionEngine, T]: ...

    async def park(self, record: SessionRecord, engine: SessionEngine, finish: FinishEvent,
                   retry_id: str = "") -> int: ...


class SessionGeneration(RequestStream):
    """The engine's TokenEvents and FinishEvent for the caller (a `RequestStream` the work task fills);
    `await ready()` gives the engine first. `tokens_consumed` is the session's count after the generation
    (set before the FinishEvent comes). The stream ends without a FinishEvent if the generation never ran.
    """

    def __init__(self, manager: SessionHost, session_id: str, turn: Turn, params: DecodingParams,
                 leave_unchanged: bool, request_id: str, retry_id: str = "", priority: int = 0, *,
                 end_taken_by_owner: bool = False):
        loop = asyncio.get_running_loop()
        self._taken = loop.create_future()  # the caller took the FinishEvent (or what ended the stream), or left
        # With `end_taken_by_owner`, the one who takes the events only passes them on (to another process):
        # the session's next operation waits for `end_taken()`, said when the real caller took the finish.
        super().__init__(request_id, params, on_cancel=self._stop_engine_request,
                         on_end_taken=None if end_taken_by_owner else self.end_taken)
        self.session_id = session_id
        self.retry_id = retry_id  # a client's id: a generation the session already applied is replayed
        self.priority = priority  # the engine request's
        self.tokens_consumed: int | None = None
        self._ready = loop.create_future()
        self._ready.add_done_callback(_retrieve)  # nobody may ask; its error also reaches the iterator
        self._engine_stream: RequestStream | None = None
        self.task = loop.create_task(self._run(manager, turn, params, leave_unchanged),
                                     name=f"session generation {request_id}")

    async def ready(self) -> SessionEngine:
        """The engine the generation runs on, once it is submitted; raises what stopped it before that."""
        return await asyncio.shield(self._ready)

    def end_taken(self) -> None:
        """The caller took the FinishEvent (or what ended the stream): the session's next operation may run."""
        _set(self._taken)

    def cancel(self) -> None:
        """The caller is gone: stop generating; what was generated so far is parked in the session."""
        super().cancel()
        _set(self._taken)

    def _stop_engine_request(self) -> None:
        if self._engine_stream is not None:
            self._engine_stream.cancel()

    async def _run(self, manager: SessionHost, turn: Turn, params: DecodingParams, leave_unchanged: bool):
        try:
            async with turn:
                record = await manager.record_of(self.session_id)
                if self.cancelled:
                    return
                applied = None if leave_unchanged else record.applied_result(self.retry_id)
                if applied is not None:
                    engine, _ = await manager.on_engine(record, lambda engine: None)
                    self._ready.set_result(engine)
                    self._replay(applied)
                    await self._taken
                    return

                async def submit(engine: SessionEngine) -> RequestStream:
                    if params.constraint is not None:  # compiled off the event loop before it is queued
                        await engine.check_constraint(params, record.history.tolist())
                    return engine.submit(GenerationRequest(
                        self.request_id, [record.last_token_id], params, initial_state=record.state,
                        history_ids=record.history.tolist(), return_final_state=not leave_unchanged,
                        priority=self.priority))

                engine, stream = await manager.on_engine(record, submit)
                self._engine_stream = stream
                if self.cancelled:
                    stream.cancel()
                self._ready.set_result(engine)
                while events := await stream.next_batch():
                    for event in events:
                        if isinstance(event, FinishEvent):
                            self.tokens_consumed = record.tokens_consumed
                            if not leave_unchanged:
                                self.tokens_consumed = await manager.park(record, engine, event, self.retry_id)
                            self.put(event)
                            await self._taken
                        else:
                            self.put(event)
        except asyncio.CancelledError as error:  # the manager is stopping
            self._fail(error)
            raise
        except Exception as error:  # noqa: BLE001 - handed to the caller, who raises it
            self._fail(error)
        finally:
            if not self._ready.done():  # left before it was submitted
                self._ready.cancel()
            self.close()

    def _replay(self, applied: dict) -> None:
        """The events of a generation this session already applied (a client's retry): its tokens in one
        event (without per-token log-probs), then its finish."""
        ids, reason = list(applied["token_ids"]), FinishReason(applied["reason"])
        if ids:
            self.put(TokenEvent(ids, None, None, applied["text"]))
        self.tokens_consumed = applied["tokens_consumed"]
        hypothesis = Hypothesis(ids, applied["log_prob"], applied["log_prob"], reason)
        self.put(FinishEvent(reason, [hypothesis], applied["text"], ids, None, 0))

    def _fail(self, error: BaseException) -> None:
        if not self._ready.done():
            if isinstance(error, asyncio.CancelledError):
                self._ready.cancel()
            else:
                self._ready.set_exception(error)
        self.fail(error)


def _set(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
