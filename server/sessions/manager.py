"""SessionManager: stateful sessions on language models, run as rows of each model's batched engine.

A session parks a `SessionRecord` (state before its last token, the history, the model version it is
bound to). Feeding is the engine's batched prefill; generating is an ordinary engine request that
starts from the parked state; both run beside every other request of the model. Operations on one
session run one at a time in the order they were acknowledged (`ordering.py`); a second generation on
a session that has one pending is refused. Sessions expire after their idle TTL and, when the server
holds `max_sessions`, the least recently used idle one is evicted; an id that ended answers NOT_FOUND
saying why (closed, expired, evicted, model removed) while it is among the last `tombstones` ended.

A session stays on the model version it started on: its engine is looked up by (name, version) at
every operation, so after a hot swap the registry serves its version on demand.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from server.decoding import DecodingParams, FinishReason
from server.engine import FinishEvent, ModelEngine
from server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from server.metrics import Metrics
from server.sessions.generation import SessionGeneration
from server.sessions.ordering import SessionLine
from server.sessions.record import SessionRecord, State
from server.sessions.store import InMemorySessionStore, SessionStore
from server.text_input import encode_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

# sessions_evicted_total{reason} labels (a client's CloseSession is not an eviction).
EXPIRED, EVICTED, MODEL_REMOVED, CLOSED = "expired", "evicted", "model_removed", "closed"


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 10_000  # open sessions, all models together; beyond, the least recently used idle one goes
    default_ttl_seconds: int = 600  # idle TTL of a session that asks for none
    max_ttl_seconds: int = 86_400  # the longest idle TTL a session may ask for
    max_input_tokens: int = 512  # tokens of one prefix or fed text
    history_tokens: int = 1024  # the end of a session's text that penalties and detokenisation look back on
    tombstones: int = 10_000  # ended ids remembered, to say why they are gone
    sweep_seconds: float = 1.0  # how often expired sessions are looked for (they also expire when touched)

    def __post_init__(self):
        for name in ("max_sessions", "default_ttl_seconds", "max_ttl_seconds", "max_input_tokens", "history_tokens",
                     "tombstones"):
            if getattr(self, name) < 1:
                raise ValueError(f"session setting {name} must be >= 1, got {getattr(self, name)}")
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError(f"the default session TTL ({self.default_ttl_seconds} s) exceeds the longest allowed "
                             f"({self.max_ttl_seconds} s)")


@dataclass(frozen=True)
class SessionInfo:
    """A session as GetSession describes it (times in unix seconds)."""

    session_id: str
    model: str
    version: int
    tokens_consumed: int
    created_at: float
    last_used_at: float
    expires_at: float
    age_seconds: float
    idle_seconds: float
    ttl_seconds: int
    state_bytes: int
    generating: bool


@dataclass(frozen=True)
class FeedResult:
    tokens_fed: int
    tokens_consumed: int
    token_ids: list[int]
    tokens: list[str]  # vocabulary strings of token_ids
    log_probs: list[float] | None  # log-prob of each fed token given everything before it (when asked)


class _Live:
    """The manager's index entry of an open session: what TTL, LRU and ordering need without the store."""

    __slots__ = ("model", "version", "ttl_seconds", "created_at", "last_used_at", "state_bytes", "line")

    def __init__(self, record: SessionRecord):
        self.model, self.version, self.ttl_seconds = record.model, record.version, record.ttl_seconds
        self.created_at, self.last_used_at = record.created_at, record.last_used_at
        self.state_bytes = record.state_bytes
        self.line = SessionLine()

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_seconds


class SessionManager:
    """Sessions of every model of `registry` (anything with `await get(name, version) -> ModelEngine`)."""

    def __init__(self, registry, limits: SessionLimits | None = None, *, store: SessionStore | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time):
        self.registry = registry
        self.limits = limits if limits is not None else SessionLimits()
        self.store = store if store is not None else InMemorySessionStore()
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self._live: OrderedDict[str, _Live] = OrderedDict()  # least recently used first
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, id), at least one entry per session
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone (bounded)
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._live)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Expire idle sessions in the background (without it they expire when next touched)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="session sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- operations -----------------------------------------------------------------------------

    async def create(self, model: str, version: int = 0, prefix: str = "", ttl_seconds: int = 0) -> SessionInfo:
        ttl = self._ttl(ttl_seconds)

        async def start(engine: ModelEngine) -> tuple[State, list[int]]:
            if engine.kind != "lm":
                raise FailedPrecondition(f"sessions need a language model; {engine.name} v{engine.version} is a "
                                         "translation model")
            history = [engine.bundle.manifest.special_tokens.bos_id, *await self._encode(engine, prefix, "prefix")]
            state = engine.runner.zero_state(1)
            if len(history) > 1:
                state, _ = await _feed_all(engine, state, history[:-1])
            return state, history

        engine, (state, history) = await self._retrying(lambda: self.registry.get(model, version), start)
        now = self.clock()
        record = SessionRecord(secrets.token_hex(16), engine.name, engine.version, state,
                               history[-self.limits.history_tokens:], len(history) - 1, ttl, now, now)
        await self._admit(record)
        return self._info(record, self._live[record.session_id])

    async def feed(self, session_id: str, text: str, want_log_probs: bool = False) -> FeedResult:
        async with self._join(session_id):
            record = await self.record_of(session_id)

            async def advance(engine: ModelEngine):
                tokens = await self._encode(engine, text, "text")
                if not tokens:
                    return tokens, record.state, []
                state, scores = await _feed_all(engine, record.state, [record.last_token_id, *tokens[:-1]],
                                                tokens[-1], want_log_probs)
                return tokens, state, scores

            engine, (tokens, state, scores) = await self.on_engine(record, advance)
            if tokens:
                record = record.advanced(state, tokens, self.clock(), self.limits.history_tokens)
                await self._save(record)
            vocab = engine.bundle.tokenizer("text")
            return FeedResult(len(tokens), record.tokens_consumed, list(tokens),
                              [vocab.id_to_token(t) or "" for t in tokens] if want_log_probs else [],
                              [float(p) for p in scores] if want_log_probs else None)

    def generate(self, session_id: str, params: DecodingParams, *, leave_unchanged: bool = False,
                 request_id: str = "") -> SessionGeneration:
        """Acknowledge a generation now (its place in the session's order); iterate the result for events.

        FailedPrecondition if the session already has a generation acknowledged and not over.
        """
        live = self._lookup(session_id)
        if live.line.generating:
            raise FailedPrecondition(f"session {_short(session_id)} is already generating; a session runs one "
                                     "generation at a time (wait for it to finish or cancel it)")
        turn = self._join(session_id, generates=True)
        generation = SessionGeneration(self, session_id, turn, params, leave_unchanged,
                                       request_id or secrets.token_hex(8))
        self._keep(generation.task)
        return generation

    async def fork(self, session_id: str, ttl_seconds: int = 0) -> SessionInfo:
        ttl = self._ttl(ttl_seconds) if ttl_seconds else None
        async with self._join(session_id):
            record = await self.record_of(session_id)
            copy = record.copy_as(secrets.token_hex(16), ttl or record.ttl_seconds, self.clock())
            await self._admit(copy)
            return self._info(copy, self._live[copy.session_id])

    async def get(self, session_id: str, *, generation_included: bool = False) -> SessionInfo:
        """A snapshot after every operation acknowledged before it; a generation still running at the end
        of the line is reported as `generating` rather than waited for, unless `generation_included`."""
        await self._lookup(session_id).line.settled(generation_included=generation_included)
        live = self._lookup(session_id)
        record = await self.record_of(session_id)
        return self._info(record, live)

    async def close(self, session_id: str) -> SessionInfo:
        async with self._join(session_id):
            record = await self.record_of(session_id)
            info = self._info(record, self._live[session_id])
            self._forget(session_id, CLOSED)
            return info

    async def sweep(self) -> int:
        """Expire every session idle past its TTL now; how many went."""
        return self._expire_due(self.clock())

    # --- for SessionGeneration ------------------------------------------------------------------

    async def record_of(self, session_id: str) -> SessionRecord:
        self._lookup(session_id)
        record = await self.store.get(session_id)
        if record is None:
            self._forget(session_id, EVICTED)
            raise NotFound(f"session {_short(session_id)} is no longer stored; create a new one")
        return record

    async def on_engine(self, record: SessionRecord, call: Callable[[ModelEngine], Awaitable[T] | T]
                        ) -> tuple[ModelEngine, T]:
        """`call(engine)` on the engine of the session's own model version (loaded on demand after a hot
        swap). A version gone from the repository ends the session (NOT_FOUND saying so)."""
        async def engine() -> ModelEngine:
            try:
                return await self.registry.get(record.model, record.version)
            except NotFound:
                self._forget(record.session_id, MODEL_REMOVED)
                raise NotFound(f"session {_short(record.session_id)} ended: model {record.model} version "
                               f"{record.version}, which it was bound to, left the repository") from None

        return await self._retrying(engine, call)

    async def park(self, record: SessionRecord, engine: ModelEngine, finish: FinishEvent) -> int:
        """Add a finished (or cancelled) generation's tokens to the session; its new tokens_consumed.

        The session takes every token the engine chose before it stopped: those of a matched stop
        string, and a final <eos>, included; a generation cancelled before its first step adds none.
        """
        eos = engine.bundle.manifest.special_tokens.eos_id
        chosen = list(finish.generated_ids)
        if finish.last_token_id == eos or (finish.final_state is None and finish.reason is FinishReason.EOS):
            chosen.append(eos)
        if not chosen:
            return record.tokens_consumed
        if finish.final_state is not None and finish.last_token_id == chosen[-1]:
            state = finish.final_state
        else:  # beam search returns no state: read the chosen tokens in one batched prefill
            state, _ = await _feed_all(engine, record.state, [record.last_token_id, *chosen[:-1]])
        record = record.advanced(state, chosen, self.clock(), self.limits.history_tokens)
        await self._save(record)
        return record.tokens_consumed

    # --- bookkeeping ----------------------------------------------------------------------------

    def _lookup(self, session_id: str) -> _Live:
        live = self._live.get(session_id)
        if live is None:
            why = self._ended.get(session_id)
            if why is not None:
                raise NotFound(f"session {_short(session_id)} {why}")
            if not session_id:
                raise InvalidArgument(field="session_id", value=session_id, allowed="a session id from CreateSession")
            raise NotFound(f"unknown session {_short(session_id)}; CreateSession opens one")
        if not live.line.busy and live.expires_at <= self.clock():
            self._forget(session_id, EXPIRED)
            raise NotFound(f"session {_short(session_id)} {self._ended[session_id]}")
        return live

    def _join(self, session_id: str, generates: bool = False):
        live = self._lookup(session_id)
        self._touch(session_id, live)
        return live.line.join(generates=generates, on_release=lambda: self._touch(session_id))

    def _touch(self, session_id: str, live: _Live | None = None) -> None:
        live = live or self._live.get(session_id)
        if live is None:
            return
        live.last_used_at = self.clock()
        self._live.move_to_end(session_id)

    async def _admit(self, record: SessionRecord) -> None:
        """Add a new session, first expiring and then evicting (least recently used, idle) to make room."""
        limit = self.limits.max_sessions
        if len(self._live) >= limit:
            self._expire_due(self.clock())
        while len(self._live) >= limit:
            victim = next((sid for sid, live in self._live.items() if not live.line.busy), None)
            if victim is None:
                raise ResourceExhausted(f"this server holds at most {limit} sessions and every one is busy; "
                                        "close sessions you no longer need, or retry later")
            self._forget(victim, EVICTED)
        live = self._live[record.session_id] = _Live(record)
        heapq.heappush(self._expiry, (live.expires_at, record.session_id))
        self.metrics.sessions_active.labels(model=record.model).inc()
        self.metrics.session_state_bytes.labels(model=record.model).inc(live.state_bytes)
        await self.store.put(record)

    async def _save(self, record: SessionRecord) -> None:
        live = self._live.get(record.session_id)
        if live is None:
            return
        if record.state_bytes != live.state_bytes:
            self.metrics.session_state_bytes.labels(model=record.model).inc(record.state_bytes - live.state_bytes)
            live.state_bytes = record.state_bytes
        await self.store.put(record)

    def _forget(self, session_id: str, reason: str) -> None:
        live = self._live.pop(session_id, None)
        if live is None:
            return
        self.metrics.sessions_active.labels(model=live.model).dec()
        self.metrics.session_state_bytes.labels(model=live.model).dec(live.state_bytes)
        if reason != CLOSED:
            self.metrics.sessions_evicted_total.labels(model=live.model, reason=reason).inc()
        self._ended[session_id] = {
            CLOSED: "was closed",
            EXPIRED: f"expired: it was idle for longer than its TTL of {live.ttl_seconds} s",
            EVICTED: f"was evicted: this server holds at most {self.limits.max_sessions} sessions and it was the "
                     "least recently used",
            MODEL_REMOVED: f"ended: model {live.model} version {live.version} left the repository",
        }[reason]
        while len(self._ended) > self.limits.tombstones:
            self._ended.popitem(last=False)
        self._keep(asyncio.ensure_future(self.store.delete(session_id)))

    def _expire_due(self, now: float) -> int:
        expired = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, session_id = heapq.heappop(heap)
            live = self._live.get(session_id)
            if live is None:
                continue
            if live.line.busy:  # never in the middle of an operation; looked at again later
                heapq.heappush(heap, (now + live.ttl_seconds, session_id))
            elif live.expires_at > now:  # used since this entry was pushed
                heapq.heappush(heap, (live.expires_at, session_id))
            else:
                self._forget(session_id, EXPIRED)
                expired += 1
        if len(heap) > 2 * len(self._live) + 1024:  # entries of ended sessions pile up: rebuild
            self._expiry = [(live.expires_at, sid) for sid, live in self._live.items()]
            heapq.heapify(self._expiry)
        return expired

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_seconds)
            try:
                self._expire_due(self.clock())
            except Exception:  # never let bookkeeping end the sweeper
                logger.exception("expiring sessions failed")

    def _info(self, record: SessionRecord, live: _Live) -> SessionInfo:
        now = self.clock()
        return SessionInfo(session_id=record.session_id, model=record.model, version=record.version,
                           tokens_consumed=record.tokens_consumed, created_at=live.created_at,
                           last_used_at=live.last_used_at, expires_at=live.expires_at,
                           age_seconds=max(0.0, now - live.created_at), idle_seconds=max(0.0, now - live.last_used_at),
                           ttl_seconds=live.ttl_seconds, state_bytes=record.state_bytes,
                           generating=live.line.generating)

    def _ttl(self, ttl_seconds: int) -> int:
        limit = self.limits.max_ttl_seconds
        if not 0 <= ttl_seconds <= limit:
            raise InvalidArgument(field="ttl_seconds", value=ttl_seconds,
                                  allowed=f"in [0, {limit}] seconds (0 = the server's default of "
                                          f"{self.limits.default_ttl_seconds} s)")
        return ttl_seconds or self.limits.default_ttl_seconds

    async def _encode(self, engine: ModelEngine, text: str, field: str) -> list[int]:
        return await encode_text(engine.bundle.tokenizer("text"), text, field, self.limits.max_input_tokens)

    async def _retrying(self, engine: Callable[[], Awaitable[ModelEngine]], call) -> tuple[ModelEngine, T]:
        """`call(await engine())`, once more with a fresh engine if the first was retired meanwhile."""
        for attempt in range(2):
            current = await engine()
            try:
                result = call(current)
                if asyncio.iscoroutine(result):
                    result = await result
                return current, result
            except Unavailable:
                if attempt or current.accepting:
                    raise
        raise AssertionError("unreachable")

    def _keep(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _feed_all(engine: ModelEngine, state: State, ids: list[int], next_token_id: int | None = None,
                    want_log_probs: bool = False) -> tuple[State, list[float]]:
    """engine.feed over `ids` in pieces the engine accepts (one piece unless they are many)."""
    size = engine.config.max_input_tokens
    scores: list[float] = []
    for start in range(0, len(ids), size):
        following = ids[start + size] if start + size < len(ids) else next_token_id
        state, part = await engine.feed(state, ids[start : start + size], want_log_probs, next_token_id=following)
        if want_log_probs:
            scores.extend(part.tolist())
    return state, scores


def _short(session_id: str) -> str:
    """An id for a message: a client's made-up id may be anything, so it is cut and quoted."""
    return repr(session_id if len(session_id) <= 40 else session_id[:40] + "...")
