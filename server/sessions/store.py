"""SessionStore: where parked sessions live between operations, behind one small async interface.

The manager reads a record when an operation on its session begins and writes it back when the
operation has changed it; it never holds a record's arrays elsewhere. A store that persists (a disk,
Redis) or is shared by replicas implements these four calls with `SessionRecord.to_bytes` /
`from_bytes`; the engine and the manager stay as they are. Coordination (the order of operations on
one session, TTL and LRU bookkeeping) is the manager's, per process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from server.sessions.record import SessionRecord


class SessionStore(ABC):
    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None:
        """The record, or None if the store does not have it."""

    @abstractmethod
    async def put(self, record: SessionRecord) -> None:
        """Create or replace the record of `record.session_id`."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Forget a record (no error if absent)."""

    @abstractmethod
    async def ids(self) -> list[str]:
        """Every stored session id (a restarted server adopts them)."""


class InMemorySessionStore(SessionStore):
    """The default: records in a dict of this process. With `serialize`, each record is kept as the bytes
    of `SessionRecord.to_bytes` (what a persistent store holds; slower, for tests of that path)."""

    def __init__(self, serialize: bool = False):
        self.serialize = serialize
        self._records: dict[str, SessionRecord | bytes] = {}

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if isinstance(record, bytes):
            return SessionRecord.from_bytes(record)
        return record

    async def put(self, record: SessionRecord) -> None:
        self._records[record.session_id] = record.to_bytes() if self.serialize else record

    async def delete(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    async def ids(self) -> list[str]:
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)
