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

The store (`store.py`) is the truth: an operation is acknowledged only after the store committed what it
changed, every write is a compare-and-set on the record's revision (an operation that lost a race with
another replica is run again on the new revision, or answered ABORTED), a restarted server adopts every
session its store holds, and with a shared store (Redis) a session unknown here is looked up there.

What differs between a store of this process's own and one shared by replicas (expiry by the index or by
the stored times, the cap counted here or in the store, adoption at start-up or on first use, sweeping, a
version not served here) is one policy object chosen at construction (`policy.py`); the manager itself is
one path for both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from server.decoding import DecodingParams
from server.engine.requests import FinishEvent, State
from server.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from server.metrics import Metrics
from server.sessions.generation import SessionGeneration
from server.sessions.index import CLOSED, Live, SessionIndex, short_id
from server.sessions.policy import policy_for
from server.sessions.port import SessionEngine
from server.sessions.record import SessionRecord
from server.sessions.store import InMemorySessionStore, MeasuredStore, SessionStore, StoreConflict, StoredSession
from server.sessions.transfer import pack, unpack
from server.text.input import encode_text

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 10_000  # open sessions, all models together; beyond, the least recently used idle one goes
    default_ttl_seconds: int = 600  # idle TTL of a session that asks for none
    max_ttl_seconds: int = 86_400  # the longest idle TTL a session may ask for
    history_tokens: int = 1024  # the end of a session's text that penalties and detokenisation look back on
    tombstones: int = 10_000  # ended ids remembered, to say why they are gone
    sweep_seconds: float = 1.0  # how often expired sessions are looked for (they also expire when touched)
    applied_ids: int = 32  # request_ids a session remembers (with their answers), so a retry is applied once

    def __post_init__(self):
        for name in ("max_sessions", "default_ttl_seconds", "max_ttl_seconds", "history_tokens",
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


class _Adoption:
    """A shared store's session being looked up for this process, and the operations waiting for it."""

    __slots__ = ("done", "last_waiter")

    def __init__(self, done: asyncio.Future):
        self.done = done
        self.last_waiter: asyncio.Future | None = None


class SessionManager:
    """Sessions of every model of `registry` (anything with `await get(name, version)` giving a model's
    `SessionEngine`, e.g. `server.registry.ModelRegistry`)."""

    def __init__(self, registry, limits: SessionLimits | None = None, *, store: SessionStore | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 signing_key: bytes | None = None):
        self.registry = registry
        self.limits = limits if limits is not None else SessionLimits()
        self.metrics = metrics if metrics is not None else Metrics()
        store = store if store is not None else InMemorySessionStore(tombstones=self.limits.tombstones)
        self.store = store if isinstance(store, MeasuredStore) else MeasuredStore(store, self.metrics)
        self.signing_key = signing_key
        self.conflict_retries = 3  # an operation that loses a race with another replica runs again this often
        self.clock = clock
        self._adopting: dict[str, _Adoption] = {}
        self._index = SessionIndex(self.metrics, self.limits.max_sessions, self.limits.tombstones)
        # What differs with a store shared by replicas (expiry, the cap, adoption, a version not served here).
        self._policy = policy_for(self.store, self._index, self.limits.max_sessions, clock)
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._index)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, adopt the sessions it holds (a restart; for a shared store, sessions are adopted
        when first used), and expire idle sessions in the background (they also expire when touched)."""
        await self.store.open()
        await self._policy.adopt_stored()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="session sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._policy.drain()
        await self.store.close()

    async def ensure(self, session_id: str) -> None:
        """Make a session this process has not seen (a shared store's, another replica's) known here; raise
        NOT_FOUND saying why if the store has no such session. Returns at once (no await) for a known one.

        Callers join the session's line right after this returns, without awaiting in between: the
        operations that waited for one adoption return in their order of arrival (each after the one before
        it), and so join the line in that order, also before an operation that arrives meanwhile.
        """
        adoption = self._adopting.get(session_id)
        if adoption is None:
            if session_id in self._index:
                return
            adoption = self._adopting[session_id] = _Adoption(asyncio.ensure_future(self._adopt(session_id)))
        previous, mine = adoption.last_waiter, asyncio.get_running_loop().create_future()
        adoption.last_waiter = mine
        try:
            await asyncio.shield(adoption.done)
            if previous is not None and not previous.done():
                await asyncio.shield(previous)
        finally:
            mine.set_result(None)  # the next waiter runs after this one has joined (it resumes via the loop)
            if adoption.last_waiter is mine and self._adopting.get(session_id) is adoption:
                del self._adopting[session_id]

    async def _adopt(self, session_id: str) -> None:
        if not session_id or self._index.why_ended(session_id) is not None:
            return  # _lookup says why
        record = await self.store.get(session_id)
        if record is not None and session_id not in self._index:
            self._index.add(StoredSession.of(record))
        elif record is None:
            why = await self.store.ended(session_id)
            if why is not None:
                self._index.remember_end(session_id, why)

    # --- operations -----------------------------------------------------------------------------

    async def create(self, model: str, version: int = 0, prefix: str = "", ttl_seconds: int = 0) -> SessionInfo:
        ttl = self._ttl(ttl_seconds)

        async def start(engine: SessionEngine) -> tuple[State, list[int]]:
            if not engine.spec.is_lm:
                raise FailedPrecondition(f"sessions need a language model; {engine.name} v{engine.version} is a "
                                         "translation model")
            history = [engine.spec.special.bos, *await self._encode(engine, prefix, "prefix")]
            if len(history) == 1:
                return engine.zero_state(1), history
            # From the zero state (None), so the engine's prefix cache serves and keeps the prefix.
            state, _ = await engine.feed(None, history[:-1])
            return state, history

        engine, (state, history) = await self._retrying(lambda: self.registry.get(model, version), start)
        now = self.clock()
        record = SessionRecord(secrets.token_hex(16), engine.name, engine.version, state,
                               history[-self.limits.history_tokens:], len(history) - 1, ttl, now, now,
                               checksum=engine.spec.identity)
        return self._info(record, await self._admit(record))

    async def feed(self, session_id: str, text: str, want_log_probs: bool = False, request_id: str = ""
                   ) -> FeedResult:
        """Append `text`. A `request_id` the session already applied returns that feed's result again
        instead of feeding twice (a client's retry)."""
        await self.ensure(session_id)
        async with self._join(session_id):
            for attempt in range(self.conflict_retries + 1):
                # First from this process's copy (a shared store's may be stale: the write's compare-and-set
                # says so, and the feed runs again on a fresh read); never stale twice.
                record = await self.record_of(session_id, cached=attempt == 0)
                applied = record.applied_result(request_id)
                if applied is not None:
                    return FeedResult(**applied)

                async def advance(engine: SessionEngine, record=record):
                    tokens = await self._encode(engine, text, "text")
                    if not tokens:
                        return tokens, record.state, None
                    state, scores = await engine.feed(record.state, [record.last_token_id, *tokens[:-1]],
                                                      want_log_probs, next_token_id=tokens[-1])
                    return tokens, state, scores

                engine, (tokens, state, scores) = await self.on_engine(record, advance)
                vocab = engine.tokenizer("text")
                tokens_consumed = record.tokens_consumed + len(tokens)
                log_probs = None if not want_log_probs else [] if scores is None else [float(p) for p in scores]
                result = FeedResult(len(tokens), tokens_consumed, list(tokens),
                                    [vocab.id_to_token(t) or "" for t in tokens] if want_log_probs else [],
                                    log_probs)
                if tokens:
                    record = record.advanced(state, tokens, self.clock(), self.limits.history_tokens)
                elif not request_id:
                    return result
                else:
                    record = record.touched(self.clock())
                # What a retry is answered with: the ids only when the answer carries them (log-probs asked for).
                remembered = dataclasses.asdict(result) if want_log_probs else dataclasses.asdict(
                    dataclasses.replace(result, token_ids=[]))
                try:
                    await self._save(record.with_applied(request_id, remembered, self.limits.applied_ids))
                    return result
                except StoreConflict:
                    if attempt == self.conflict_retries:
                        raise _aborted(session_id, "Feed") from None

    def generate(self, session_id: str, params: DecodingParams, *, leave_unchanged: bool = False,
                 request_id: str = "", retry_id: str = "", priority: int = 0,
                 end_taken_by_owner: bool = False) -> SessionGeneration:
        """Acknowledge a generation now (its place in the session's order); iterate the result for events.

        FailedPrecondition if the session already has a generation acknowledged and not over. A `retry_id`
        (a client's request_id) that the session already applied replays that generation's result instead.
        `priority` is the engine request's (checked by the engine). With a shared store, `await
        ensure(session_id)` first.
        """
        live = self._lookup(session_id)  # (the caller awaited ensure(session_id) first)
        if live.line.generating:
            raise FailedPrecondition(f"session {short_id(session_id)} is already generating; a session runs one "
                                     "generation at a time (wait for it to finish or cancel it)")
        turn = self._join(session_id, generates=True)
        generation = SessionGeneration(self, session_id, turn, params, leave_unchanged,
                                       request_id or secrets.token_hex(8), retry_id, priority,
                                       end_taken_by_owner=end_taken_by_owner)
        self._keep(generation.task)
        return generation

    async def fork(self, session_id: str, ttl_seconds: int = 0) -> SessionInfo:
        ttl = self._ttl(ttl_seconds) if ttl_seconds else None
        await self.ensure(session_id)
        async with self._join(session_id):
            record = await self.record_of(session_id)
            copy = record.copy_as(secrets.token_hex(16), ttl or record.ttl_seconds, self.clock())
            live = await self._admit(copy)
            try:  # the original was used too: its idle time starts again, also after a restart
                await self._save(record.touched(copy.created_at))
            except StoreConflict:
                pass  # another replica used it at the same time, which restarted its idle time anyway
            return self._info(copy, live)

    async def get(self, session_id: str, *, generation_included: bool = False) -> SessionInfo:
        """A snapshot after every operation acknowledged before it; a generation still running at the end
        of the line is reported as `generating` rather than waited for, unless `generation_included`."""
        await self.ensure(session_id)
        await self._lookup(session_id).line.settled(generation_included=generation_included)
        live = self._lookup(session_id)
        record = await self.record_of(session_id)
        return self._info(record, live)

    async def close(self, session_id: str) -> SessionInfo:
        await self.ensure(session_id)
        async with self._join(session_id):
            record = await self.record_of(session_id)
            info = self._info(record, self._lookup(session_id))
            await self._policy.end(session_id, CLOSED)
            return info

    async def export(self, session_id: str) -> bytes:
        """The session as bytes another server can import (signed when the manager has a signing key)."""
        await self.ensure(session_id)
        async with self._join(session_id):
            return pack(await self.record_of(session_id), self.signing_key)

    async def import_(self, data: bytes, ttl_seconds: int = 0) -> SessionInfo:
        """A new session (a new id) from `export`'s bytes: refused if they were tampered with, or do not fit
        the model version they name (version missing, another bundle, another state shape)."""
        record = unpack(data, self.signing_key)
        ttl = self._ttl(ttl_seconds) if ttl_seconds else min(record.ttl_seconds, self.limits.max_ttl_seconds)

        async def check(engine: SessionEngine) -> None:
            if not engine.spec.is_lm:
                raise FailedPrecondition(f"the session was made on {record.model} v{record.version}, which is a "
                                         "translation model here")
            checksum = engine.spec.identity
            if record.checksum and record.checksum != checksum:
                raise FailedPrecondition(
                    f"the session was made on {record.model} v{record.version} with bundle checksum "
                    f"{record.checksum}; this server's {record.model} v{record.version} has checksum {checksum}")
            zero = engine.zero_state(1)
            shapes = [list(s.shape) for s in record.state]
            expected = [list(s.shape) for s in zero]
            dtypes = [str(s.dtype) for s in record.state]
            if shapes != expected or dtypes != [str(s.dtype) for s in zero]:
                raise InvalidArgument(f"the session's state has shapes {shapes} ({', '.join(dtypes)}); "
                                      f"{record.model} v{record.version} has state shapes {expected}",
                                      field="data", value="state shapes", allowed=str(expected))

        try:
            await self._retrying(lambda: self.registry.get(record.model, record.version), check)
        except NotFound as error:
            raise FailedPrecondition(f"the session was made on {record.model} v{record.version}, which this "
                                     f"server cannot serve: {error}") from None
        now = self.clock()
        copy = record.copy_as(secrets.token_hex(16), ttl, now)
        return self._info(copy, await self._admit(copy))

    async def sweep(self) -> int:
        """Expire every session idle past its TTL now; how many went."""
        return await self._policy.sweep()

    # --- for SessionGeneration ------------------------------------------------------------------

    async def record_of(self, session_id: str, cached: bool = False) -> SessionRecord:
        """The session's record from the store (with `cached`, this process's copy if it has one)."""
        live = self._lookup(session_id)
        record = await (self.store.get_cached(session_id) if cached else self.store.get(session_id))
        if record is None:
            why = await self.store.ended(session_id)  # ended by another replica, or lost by the store
            why = self._index.forget(session_id, None, why or "is no longer stored; create a new one")
            raise NotFound(f"session {short_id(session_id)} {why}")
        await self._policy.refresh(session_id, live, record)
        return record

    async def on_engine(self, record: SessionRecord, call: Callable[[SessionEngine], Awaitable[T] | T]
                        ) -> tuple[SessionEngine, T]:
        """`call(engine)` on the engine of the session's own model version (loaded on demand after a hot
        swap). A version this server does not serve is the policy's (`SessionPolicy.version_missing`)."""
        async def engine() -> SessionEngine:
            try:
                found = await self.registry.get(record.model, record.version)
            except NotFound:
                raise await self._policy.version_missing(record) from None
            if record.checksum and found.spec.identity != record.checksum:
                raise FailedPrecondition(
                    f"session {short_id(record.session_id)} is bound to model {record.model} version {record.version} "
                    f"with bundle checksum {record.checksum}; this server's has {found.spec.identity}")
            return found

        return await self._retrying(engine, call)

    async def park(self, record: SessionRecord, engine: SessionEngine, finish: FinishEvent,
                   retry_id: str = "") -> int:
        """Add a finished (or cancelled) generation's tokens to the session; its new tokens_consumed.

        The session takes every token the engine chose before it stopped (`SessionEngine.park`): those of
        a matched stop string, and a final <eos>, included; a generation cancelled before its first step
        adds none.
        """
        state, chosen = await engine.park(record.state, record.last_token_id, finish)
        if not chosen:
            return record.tokens_consumed
        record = record.advanced(state, chosen, self.clock(), self.limits.history_tokens)
        best = finish.hypotheses[0] if finish.hypotheses else None
        record = record.with_applied(retry_id, {
            "token_ids": list(finish.generated_ids), "text": finish.text, "reason": finish.reason.value,
            "log_prob": best.log_prob if best is not None else 0.0, "tokens_consumed": record.tokens_consumed},
            self.limits.applied_ids)
        try:
            await self._save(record)
        except StoreConflict:
            raise _aborted(record.session_id, "GenerateInSession") from None
        return record.tokens_consumed

    # --- bookkeeping ----------------------------------------------------------------------------

    def _lookup(self, session_id: str) -> Live:
        live = self._index.get(session_id)
        if live is None:
            why = self._index.why_ended(session_id)
            if why is not None:
                raise NotFound(f"session {short_id(session_id)} {why}")
            if not session_id:
                raise InvalidArgument(field="session_id", value=session_id, allowed="a session id from CreateSession")
            raise NotFound(f"unknown session {short_id(session_id)}; CreateSession opens one")
        self._policy.expire_if_idle(session_id, live)
        return live

    def _join(self, session_id: str, generates: bool = False):
        live = self._lookup(session_id)
        self._index.touch(session_id, self.clock())
        return live.line.join(generates=generates, on_release=lambda: self._index.touch(session_id, self.clock()))

    async def _admit(self, record: SessionRecord) -> Live:
        """Add a new session, first expiring and then evicting (least recently used, idle) to make room.
        The cap counts the store's sessions (with a shared store, every replica's)."""
        await self._policy.make_room()
        await self.store.put(record)
        return self._index.add(record)

    async def _save(self, record: SessionRecord) -> None:
        if record.session_id not in self._index:
            return
        self._index.resize(record.session_id, record.state_bytes)
        await self.store.put(record)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_seconds)
            try:
                await self._policy.sweep_periodically()
            except Exception:  # never let bookkeeping end the sweeper
                logger.exception("expiring sessions failed")

    def _info(self, record: SessionRecord, live: Live) -> SessionInfo:
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

    async def _encode(self, engine: SessionEngine, text: str, field: str) -> list[int]:
        return await encode_text(engine.tokenizer("text"), text, field, engine.max_input_tokens)

    async def _retrying(self, engine: Callable[[], Awaitable[SessionEngine]], call) -> tuple[SessionEngine, T]:
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


def _aborted(session_id: str, rpc: str) -> Aborted:
    return Aborted(f"{rpc} on session {short_id(session_id)} was not applied: another replica changed the session at "
                   "the same time; retry it (with the same request_id, a retry is applied at most once)")
