"""SessionStore: where sessions live between operations, and the truth about them.

The manager reads a record when an operation on its session begins and writes it back, before the
operation is acknowledged, when the operation changed it. Every write is a compare-and-set on the
record's revision: `put(record)` stores `record` only if the stored one is `record.revision - 1`
(absent for revision 1), so two processes sharing a store (replicas on one Redis) never both apply an
operation to the same version; the loser gets `StoreConflict`. A store also remembers, bounded, why
ended sessions ended, and lists what it holds so a restarted server (or another replica) serves it.

Stores are named by a URL (`server.sessions.stores.open_store`): `memory`, `sqlite:PATH`,
`redis://HOST:PORT[/DB]`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

from server.sessions.record import SessionRecord


class StoreConflict(Exception):
    """The stored record is not the revision a write expected: another process changed the session."""


class StoreUnavailable(Exception):
    """The store cannot be reached or written (the message says which store and why)."""


@dataclass(frozen=True)
class StoredSession:
    """What the manager's index needs of a stored session, without its state."""

    session_id: str
    model: str
    version: int
    ttl_seconds: int
    created_at: float
    last_used_at: float
    state_bytes: int

    @classmethod
    def of(cls, record: SessionRecord) -> StoredSession:
        return cls(record.session_id, record.model, record.version, record.ttl_seconds, record.created_at,
                   record.last_used_at, record.state_bytes)

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_seconds


class SessionStore(ABC):
    url: str = ""
    shared = False  # other processes write it too: records are read from it at every operation

    async def open(self) -> None:
        """Connect / create; raise StoreUnavailable naming the store if it cannot be used."""
        return None

    async def close(self) -> None:
        """Flush and release."""
        return None

    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None:
        """The record, or None if the store does not have it."""

    async def get_cached(self, session_id: str) -> SessionRecord | None:
        """The record as this process last saw it, if it kept one (it may be stale for a shared store: a
        write over it then fails with StoreConflict); else `get`."""
        return await self.get(session_id)

    @abstractmethod
    async def put(self, record: SessionRecord) -> None:
        """Store `record` if the stored record is `record.revision - 1` (none for revision 1), durably
        before returning; else StoreConflict."""

    @abstractmethod
    async def delete(self, session_id: str, why: str) -> None:
        """Forget a record and remember `why` it ended (bounded); no error if absent."""

    @abstractmethod
    async def ended(self, session_id: str) -> str | None:
        """Why a session that ended ended (among the last ones remembered), else None."""

    @abstractmethod
    async def sessions(self) -> list[StoredSession]:
        """Every stored session (a restarted server adopts them)."""

    @abstractmethod
    async def count(self) -> int:
        """How many sessions the store holds."""

    async def ids(self) -> list[str]:
        return [stored.session_id for stored in await self.sessions()]

    async def least_recently_used(self, limit: int) -> list[str]:
        """Up to `limit` ids, least recently used first."""
        stored = sorted(await self.sessions(), key=lambda s: s.last_used_at)
        return [s.session_id for s in stored[:limit]]

    async def due(self, now: float, limit: int = 1000) -> list[str]:
        """Up to `limit` ids whose idle TTL ran out by `now` (for shared stores, whose sessions no one
        process indexes)."""
        return [s.session_id for s in await self.sessions() if s.expires_at <= now][:limit]

    async def expire(self, session_id: str, why: str, now: float) -> bool:
        """Delete the session if, as stored, its idle TTL ran out by `now` (another process may have
        used it since this one looked); whether it went."""
        record = await self.get(session_id)
        if record is None or record.expires_at > now:
            return False
        await self.delete(session_id, why)
        return True


class InMemorySessionStore(SessionStore):
    """Records in a dict of this process: nothing survives it. With `serialize`, each record is kept as the
    bytes of `SessionRecord.to_bytes` (what a persistent store holds; slower, for tests of that path)."""

    url = "memory"

    def __init__(self, serialize: bool = False, tombstones: int = 10_000):
        self.serialize = serialize
        self.tombstones = tombstones
        self._records: dict[str, SessionRecord | bytes] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if isinstance(record, bytes):
            return SessionRecord.from_bytes(record)
        return record

    async def put(self, record: SessionRecord) -> None:
        current = self._records.get(record.session_id)
        stored_revision = 0 if current is None else (
            SessionRecord.from_bytes(current).revision if isinstance(current, bytes) else current.revision)
        if stored_revision != record.revision - 1:
            raise StoreConflict(f"session {record.session_id} is at revision {stored_revision}, not "
                                f"{record.revision - 1}")
        self._records[record.session_id] = record.to_bytes() if self.serialize else record

    async def delete(self, session_id: str, why: str = "was closed") -> None:
        if self._records.pop(session_id, None) is not None:
            self._ended[session_id] = why
            while len(self._ended) > self.tombstones:
                self._ended.popitem(last=False)

    async def ended(self, session_id: str) -> str | None:
        return self._ended.get(session_id)

    async def sessions(self) -> list[StoredSession]:
        return [StoredSession.of(await self.get(sid)) for sid in list(self._records)]

    async def count(self) -> int:
        return len(self._records)

    async def ids(self) -> list[str]:
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)


class MeasuredStore(SessionStore):
    """A store with every call timed (`seqserve_session_store_seconds{op}`) and its failures counted
    (`seqserve_session_store_errors_total{op}`); a store that fails while serving is UNAVAILABLE to clients."""

    def __init__(self, store: SessionStore, metrics):
        self.inner = store
        self.url, self.shared = store.url, store.shared
        self._seconds = {op: metrics.session_store_seconds.labels(op=op) for op in _OPS}
        self._errors = {op: metrics.session_store_errors_total.labels(op=op) for op in _OPS}

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def _timed(self, op: str, awaitable):
        from server.errors import Unavailable

        started = time.perf_counter()
        try:
            return await awaitable
        except StoreUnavailable as error:
            self._errors[op].inc()
            raise Unavailable(f"the session store is unavailable: {error}") from None
        except StoreConflict:
            raise
        except Exception:
            self._errors[op].inc()
            raise
        finally:
            self._seconds[op].observe(time.perf_counter() - started)

    async def get(self, session_id):
        return await self._timed("get", self.inner.get(session_id))

    async def get_cached(self, session_id):
        return await self._timed("get", self.inner.get_cached(session_id))

    async def put(self, record):
        return await self._timed("put", self.inner.put(record))

    async def delete(self, session_id, why="was closed"):
        return await self._timed("delete", self.inner.delete(session_id, why))

    async def ended(self, session_id):
        return await self._timed("ended", self.inner.ended(session_id))

    async def sessions(self):
        return await self._timed("scan", self.inner.sessions())

    async def count(self):
        return await self._timed("scan", self.inner.count())

    async def ids(self):
        return await self._timed("scan", self.inner.ids())

    async def least_recently_used(self, limit):
        return await self._timed("scan", self.inner.least_recently_used(limit))

    async def due(self, now, limit=1000):
        return await self._timed("scan", self.inner.due(now, limit))

    async def expire(self, session_id, why, now):
        return await self._timed("delete", self.inner.expire(session_id, why, now))


_OPS = ("get", "put", "delete", "ended", "scan")
