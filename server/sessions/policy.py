"""Where sessions differ by the store they live in: a store of this process's own, or one shared by replicas.

With a store of its own (`memory`, `sqlite:PATH`) this process is the store's only writer, so its index is
the truth about times and the cap (`LocalPolicy`): a restarted server adopts every stored session at
start-up (ending those whose idle time ran out while it was down); a session idle past its TTL expires when
touched or when the sweeper finds it due here; the cap counts the sessions indexed here (the least recently
used idle one is evicted to make room); a model version gone from the repository ends the sessions bound
to it (NOT_FOUND saying so).

With a shared store (Redis, `SessionStore.shared`) other replicas use the same sessions, so the stored
times are the truth (`SharedPolicy`): sessions are adopted when first used here (`SessionManager.ensure`),
not at start-up; a session expires when its stored idle time ran out, whichever replica sweeps or reads it
first; the cap counts the store's sessions, every replica's; an index entry idle here past its TTL is
dropped without ending the session (another replica may be using it); a version this server does not serve
leaves the session alone (another replica may serve it: FAILED_PRECONDITION).

`SessionManager` holds one policy, chosen once by `policy_for` from `store.shared`; everything else it does
is one path for both. A policy never joins a session's line; where it ends sessions by itself (sweeps,
eviction) it passes over those with an operation in progress.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from server.errors import FailedPrecondition, NotFound, ResourceExhausted, SeqserveError
from server.sessions.index import EVICTED, EXPIRED, MODEL_REMOVED, Live, SessionIndex, short_id
from server.sessions.record import SessionRecord
from server.sessions.store import SessionStore

logger = logging.getLogger(__name__)


class SessionPolicy(ABC):
    """The operations that differ between a store of this process's own and a shared one (see the module);
    `end` is theirs in common."""

    def __init__(self, index: SessionIndex, store: SessionStore, max_sessions: int, clock: Callable[[], float]):
        self.index = index
        self.store = store
        self.max_sessions = max_sessions  # open sessions; beyond, the least recently used idle one goes
        self.clock = clock

    @abstractmethod
    async def adopt_stored(self) -> None:
        """At start-up, after the store opened: index the sessions this process serves from the start."""

    @abstractmethod
    def expire_if_idle(self, session_id: str, live: Live) -> None:
        """An operation looks the session up (synchronously): NOT_FOUND if it is to expire now."""

    @abstractmethod
    async def refresh(self, session_id: str, live: Live, record: SessionRecord) -> None:
        """The operation read `record` from the store: bring the index entry up to date with it, or end the
        session (NOT_FOUND) if the record says it expired."""

    @abstractmethod
    async def make_room(self) -> None:
        """Before a new session is stored: below the cap, expiring and then evicting idle sessions; else
        RESOURCE_EXHAUSTED."""

    @abstractmethod
    async def sweep(self) -> int:
        """Expire the sessions idle past their TTL now (none with an operation in progress); how many went."""

    async def sweep_periodically(self) -> None:
        """What the background sweeper does every `sweep_seconds`."""
        await self.sweep()

    @abstractmethod
    async def version_missing(self, record: SessionRecord) -> SeqserveError:
        """The registry has no `record.model` v`record.version`: what the operation raises."""

    async def drain(self) -> None:
        """On the way out: wait for the store writes started in the background."""
        return None

    async def end(self, session_id: str, reason: str) -> None:
        """End a session: forgotten here, deleted from the store (with why) before this returns."""
        why = self.index.forget(session_id, reason)
        if why is not None:
            await self.store.delete(session_id, why)


class LocalPolicy(SessionPolicy):
    """This process is the store's only writer: the index decides expiry and the cap (see the module)."""

    def __init__(self, index: SessionIndex, store: SessionStore, max_sessions: int, clock: Callable[[], float]):
        super().__init__(index, store, max_sessions, clock)
        self._deletes: set[asyncio.Future] = set()  # store deletes of sessions ended from synchronous code

    async def adopt_stored(self) -> None:
        now = self.clock()
        for stored in await self.store.sessions():
            if stored.session_id in self.index:
                continue
            if stored.expires_at <= now:  # its idle time ran out while the server was down
                why = self.index.why(EXPIRED, stored)
                await self.store.delete(stored.session_id, why)
                self.index.remember_end(stored.session_id, why)
                self.index.count_eviction(stored.model, EXPIRED)
                continue
            self.index.add(stored)

    def expire_if_idle(self, session_id: str, live: Live) -> None:
        if not live.line.busy and live.expires_at <= self.clock():
            why = self._end_soon(session_id, EXPIRED)
            raise NotFound(f"session {short_id(session_id)} {why}")

    async def refresh(self, session_id: str, live: Live, record: SessionRecord) -> None:
        return None  # nobody else writes the store: the index's times are the truth

    async def make_room(self) -> None:
        limit = self.max_sessions
        if len(self.index) >= limit:
            self._expire_due()
        while len(self.index) >= limit:
            victim = self.index.least_recently_used_idle()
            if victim is None:
                raise ResourceExhausted(f"this server holds at most {limit} sessions and every one is busy; "
                                        "close sessions you no longer need, or retry later")
            self._end_soon(victim, EVICTED)

    async def sweep(self) -> int:
        return self._expire_due()

    async def version_missing(self, record: SessionRecord) -> SeqserveError:
        await self.end(record.session_id, MODEL_REMOVED)
        return NotFound(f"session {short_id(record.session_id)} ended: model {record.model} version "
                        f"{record.version}, which it was bound to, left the repository")

    async def drain(self) -> None:
        await asyncio.gather(*self._deletes, return_exceptions=True)  # ends are kept, also on the way out

    def _expire_due(self) -> int:
        expired = 0
        for session_id in self.index.due(self.clock()):
            self._end_soon(session_id, EXPIRED)
            expired += 1
        return expired

    def _end_soon(self, session_id: str, reason: str) -> str | None:
        """`end` from synchronous code: the store's delete runs in the background. Why it ended."""
        why = self.index.forget(session_id, reason)
        if why is not None:
            delete = asyncio.ensure_future(self._delete_logged(session_id, why))
            self._deletes.add(delete)
            delete.add_done_callback(self._deletes.discard)
        return why

    async def _delete_logged(self, session_id: str, why: str) -> None:
        try:
            await self.store.delete(session_id, why)
        except Exception:  # the record stays; the next restart or sweep ends it again
            logger.exception("deleting session %s from the store failed", short_id(session_id))


class SharedPolicy(SessionPolicy):
    """Other replicas use the same sessions: the store's times and count decide (see the module)."""

    async def adopt_stored(self) -> None:
        return None  # a session is adopted when first used here (SessionManager.ensure)

    def expire_if_idle(self, session_id: str, live: Live) -> None:
        return None  # this index's times may be stale: `refresh` decides by the stored ones

    async def refresh(self, session_id: str, live: Live, record: SessionRecord) -> None:
        now = self.clock()
        if record.expires_at <= now and live.line.pending <= 1:  # idle past its TTL, and not by us
            why = self.index.why(EXPIRED, record)
            if await self.store.expire(session_id, why, now):
                self.index.forget(session_id, EXPIRED, why)
                raise NotFound(f"session {short_id(session_id)} {why}")
        # Another replica may have used it since this one did.
        live.last_used_at = max(live.last_used_at, record.last_used_at)
        live.ttl_seconds = record.ttl_seconds

    async def make_room(self) -> None:
        limit = self.max_sessions
        excess = await self.store.count() - limit + 1
        if excess <= 0:
            return
        await self.sweep()
        excess = await self.store.count() - limit + 1
        if excess <= 0:
            return
        for victim in await self.store.least_recently_used(excess + 64):
            if excess <= 0:
                return
            live = self.index.get(victim)
            if live is not None and live.line.busy:
                continue
            why = self.index.forget(victim, EVICTED) if live is not None else None
            await self.store.delete(victim, why or self.index.why_ended(victim) or self.index.why(EVICTED, None))
            excess -= 1
        if excess > 0:
            raise ResourceExhausted(f"the session store holds at most {limit} sessions and every one is busy; "
                                    "close sessions you no longer need, or retry later")

    async def sweep(self) -> int:
        """Any replica may sweep the store's sessions whose stored idle time ran out."""
        now = self.clock()
        expired = 0
        for session_id in await self.store.due(now):
            live = self.index.get(session_id)
            if live is not None and live.line.busy:
                continue
            record = await self.store.get(session_id)
            if record is None:
                continue
            why = self.index.why(EXPIRED, record)
            if await self.store.expire(session_id, why, now):
                expired += 1
                if self.index.forget(session_id, EXPIRED, why) is None:
                    self.index.count_eviction(record.model, EXPIRED)
                    self.index.remember_end(session_id, why)
        return expired

    async def sweep_periodically(self) -> None:
        await self.sweep()
        self.index.unindex_idle(self.clock())

    async def version_missing(self, record: SessionRecord) -> SeqserveError:
        return FailedPrecondition(
            f"session {short_id(record.session_id)} is bound to model {record.model} version {record.version}, "
            "which this server does not serve; send it to a replica that does")


def policy_for(store: SessionStore, index: SessionIndex, max_sessions: int, clock: Callable[[], float]
               ) -> SessionPolicy:
    """The policy for `store`: `SharedPolicy` if other processes write it too (`store.shared`), else
    `LocalPolicy`."""
    policy = SharedPolicy if store.shared else LocalPolicy
    return policy(index, store, max_sessions, clock)
