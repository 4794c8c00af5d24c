"""SqliteSessionStore (`sqlite:PATH`): sessions in one embedded SQLite file, durable before acknowledged.

The file is in WAL mode with `synchronous=FULL`: a commit returns once its WAL frames are fsynced, so a
record whose `put` returned survives `kill -9` and a power cut. One thread of this store does every
SQLite call; the writes queued while it was committing go together into the next transaction (group
commit: one fsync for many sessions' operations), which is what keeps a busy server's throughput close
to the memory store's. Records this process wrote or read are kept decoded in a bounded cache: a
SQLite file is one server's store (for replicas, use Redis), so the cache is never stale.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

from server.sessions.record import SessionRecord
from server.sessions.store import SessionStore, StoreConflict, StoredSession, StoreUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, revision INTEGER NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,
    ttl_seconds INTEGER NOT NULL, created_at REAL NOT NULL, last_used_at REAL NOT NULL,
    state_bytes INTEGER NOT NULL, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ended (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, why TEXT NOT NULL);
"""

_STOP = object()


class SqliteSessionStore(SessionStore):
    def __init__(self, path: str, *, tombstones: int = 10_000, cache_records: int = 4096,
                 setting: str = "session_store"):
        self.path = Path(path).expanduser()
        self.url = f"sqlite:{path}"
        self.tombstones = tombstones
        self._setting = setting
        self._cache: OrderedDict[str, SessionRecord] = OrderedDict()
        self._cache_records = cache_records
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            return
        opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(target=self._work, args=(asyncio.get_running_loop(), opened),
                                        name="session-store-sqlite", daemon=True)
        self._thread.start()
        try:
            await opened
        except StoreUnavailable:
            self._thread = None
            raise

    async def close(self) -> None:
        if self._thread is None:
            return
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # --- the interface ----------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._cache.get(session_id)
        if record is not None:
            self._cache.move_to_end(session_id)
            return record
        data = await self._call("read", "SELECT record FROM sessions WHERE id = ?", (session_id,))
        if not data:
            return None
        record = SessionRecord.from_bytes(data[0][0])
        self._remember(record)
        return record

    async def put(self, record: SessionRecord) -> None:
        await self._call("put", record)
        self._remember(record)

    async def delete(self, session_id: str, why: str = "was closed") -> None:
        self._cache.pop(session_id, None)
        await self._call("delete", session_id, why)

    async def ended(self, session_id: str) -> str | None:
        rows = await self._call("read", "SELECT why FROM ended WHERE id = ?", (session_id,))
        return rows[0][0] if rows else None

    async def sessions(self) -> list[StoredSession]:
        rows = await self._call("read", "SELECT id, model, version, ttl_seconds, created_at, last_used_at, "
                                        "state_bytes FROM sessions", ())
        return [StoredSession(*row) for row in rows]

    async def count(self) -> int:
        return (await self._call("read", "SELECT COUNT(*) FROM sessions", ()))[0][0]

    async def least_recently_used(self, limit: int) -> list[str]:
        rows = await self._call("read", "SELECT id FROM sessions ORDER BY last_used_at LIMIT ?", (limit,))
        return [row[0] for row in rows]

    # --- the store's thread ---------------------------------------------------------------------------

    def _remember(self, record: SessionRecord) -> None:
        self._cache[record.session_id] = record
        self._cache.move_to_end(record.session_id)
        while len(self._cache) > self._cache_records:
            self._cache.popitem(last=False)

    async def _call(self, kind: str, *args):
        if self._thread is None:
            raise StoreUnavailable(f"{self._setting} {self.url} is not open")
        future = asyncio.get_running_loop().create_future()
        self._jobs.put((kind, args, future))
        return await future

    def _work(self, loop: asyncio.AbstractEventLoop, opened: asyncio.Future) -> None:
        try:
            self._db = self._connect()
        except (sqlite3.Error, OSError) as error:
            loop.call_soon_threadsafe(_settle, opened, None, StoreUnavailable(
                f"{self._setting} {self.url}: cannot open or create {self.path}: {error}"))
            return
        loop.call_soon_threadsafe(_settle, opened, None, None)
        try:
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    return
                batch = [job]
                while job[0] != "read":  # writes queued meanwhile join this transaction
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is _STOP or job[0] == "read":
                        self._jobs.put(job)  # after this batch (a stop waits for the batch's commit)
                        break
                    batch.append(job)
                results = self._run(batch)
                for (_, _, future), (result, error) in zip(batch, results, strict=True):
                    loop.call_soon_threadsafe(_settle, future, result, error)
        finally:
            self._db.close()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: every commit fsyncs the WAL
            db.executescript(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")  # proves the file is writable now, not at the first session
            db.execute("COMMIT")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _run(self, batch: list) -> list[tuple[object, BaseException | None]]:
        db = self._db
        if batch[0][0] == "read":
            _, (sql, params), _ = batch[0]
            try:
                return [(db.execute(sql, params).fetchall(), None)]
            except sqlite3.Error as error:
                return [(None, StoreUnavailable(f"{self._setting} {self.url}: reading failed: {error}"))]
        results: list[tuple[object, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for kind, args, _ in batch:
                results.append(self._put(*args) if kind == "put" else self._delete(*args))
            db.execute("COMMIT")
        except sqlite3.Error as error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            failure = StoreUnavailable(f"{self._setting} {self.url}: writing failed: {error}")
            return [(None, failure)] * len(batch)
        return results

    def _put(self, record: SessionRecord) -> tuple[object, BaseException | None]:
        row = (record.revision, record.model, record.version, record.ttl_seconds, record.created_at,
               record.last_used_at, record.state_bytes, record.to_bytes(), record.session_id)
        if record.revision == 1:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO sessions (revision, model, version, ttl_seconds, created_at, last_used_at, "
                "state_bytes, record, id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        else:
            cursor = self._db.execute(
                "UPDATE sessions SET revision = ?, model = ?, version = ?, ttl_seconds = ?, created_at = ?, "
                "last_used_at = ?, state_bytes = ?, record = ? WHERE id = ? AND revision = ?",
                (*row, record.revision - 1))
        if cursor.rowcount != 1:
            return None, StoreConflict(f"session {record.session_id} changed since revision {record.revision - 1}")
        return None, None

    def _delete(self, session_id: str, why: str) -> tuple[object, BaseException | None]:
        if self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount:
            self._db.execute("INSERT OR REPLACE INTO ended (id, why) VALUES (?, ?)", (session_id, why))
            self._db.execute("DELETE FROM ended WHERE seq <= (SELECT MAX(seq) FROM ended) - ?", (self.tombstones,))
        return None, None


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
