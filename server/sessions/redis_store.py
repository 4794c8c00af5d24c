"""RedisSessionStore (`redis://HOST:PORT[/DB]`): sessions in one Redis, shared by every replica on it.

Each session is a hash (`seqserve:session:ID`: revision, the record's bytes, its expiry) and sits in
two sorted sets, by last use (the LRU cap) and by expiry (the sweep). Every write is one Lua script,
atomic in Redis: a put stores the record only over the revision it was read at (compare-and-set), so
two replicas never both apply an operation to the same version of a session; an expiry deletes only a
session whose stored idle time ran out (another replica may have just used it). Ended ids and why they
ended are kept, bounded, in a hash and a sorted set by age. Records this replica read or wrote are kept
(bounded) for `get_cached`: a Feed starts from them without a round trip, and if another replica changed
the session meanwhile, its compare-and-set fails and it runs again on a fresh read.

Durability is Redis's: with `appendonly yes` and `appendfsync always` a write is on disk when Redis
answers it (see docs/sessions.md for what a Redis failover loses).
"""

from __future__ import annotations

import json
from collections import OrderedDict

from server.sessions.record import SessionRecord
from server.sessions.store import SessionStore, StoreConflict, StoredSession, StoreUnavailable

PREFIX = "seqserve:"
_LRU, _EXPIRY, _ENDED, _WHY, _SEQ = (PREFIX + name for name in ("lru", "expiry", "ended", "why", "ended-seq"))

_PUT = """
local current = redis.call('HGET', KEYS[1], 'revision')
local expected = tonumber(ARGV[1])
if (current == false and expected ~= 0) or (current ~= false and tonumber(current) ~= expected) then
  return 0
end
redis.call('HSET', KEYS[1], 'revision', expected + 1, 'record', ARGV[2], 'meta', ARGV[3], 'expires_at', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
return 1
"""

# KEYS: session hash, lru, expiry, ended, why, ended-seq; ARGV: id, why, tombstones, expired-by (or '')
_DELETE = """
if ARGV[4] ~= '' then
  local expires_at = redis.call('HGET', KEYS[1], 'expires_at')
  if expires_at == false or tonumber(expires_at) > tonumber(ARGV[4]) then return 0 end
end
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[6]), ARGV[1])
local extra = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[3])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[4], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, extra - 1)
  redis.call('HDEL', KEYS[5], unpack(old))
end
return 1
"""


class RedisSessionStore(SessionStore):
    shared = True

    def __init__(self, url: str, *, tombstones: int = 10_000, setting: str = "session_store",
                 cache_records: int = 4096):
        import redis.asyncio as redis

        self.url = url
        self.tombstones = tombstones
        self._cache: OrderedDict[str, SessionRecord] = OrderedDict()  # what this replica last read or wrote
        self._cache_records = cache_records
        self._setting = setting
        self._errors = (redis.RedisError, OSError)
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                               health_check_interval=10)
        except ValueError as error:
            raise ValueError(f"{setting} {url!r} is not a Redis URL: {error}") from None
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)

    async def open(self) -> None:
        try:
            await self._redis.ping()
        except self._errors as error:
            raise StoreUnavailable(f"{self._setting} {self.url}: Redis does not answer: {error}") from None

    async def close(self) -> None:
        await self._redis.aclose()

    async def get(self, session_id: str) -> SessionRecord | None:
        data = await self._call(self._redis.hget(_key(session_id), "record"), "reading")
        if data is None:
            self._cache.pop(session_id, None)
            return None
        record = SessionRecord.from_bytes(data)
        self._remember(record)
        return record

    async def get_cached(self, session_id: str) -> SessionRecord | None:
        """What this replica last read or wrote (no round trip), else `get`: for operations that are cheap
        to run again when a compare-and-set shows another replica changed the session meanwhile."""
        record = self._cache.get(session_id)
        if record is None:
            return await self.get(session_id)
        self._cache.move_to_end(session_id)
        return record

    def _remember(self, record: SessionRecord) -> None:
        self._cache[record.session_id] = record
        self._cache.move_to_end(record.session_id)
        while len(self._cache) > self._cache_records:
            self._cache.popitem(last=False)

    async def put(self, record: SessionRecord) -> None:
        meta = json.dumps([record.model, record.version, record.ttl_seconds, record.created_at, record.last_used_at,
                           record.state_bytes])
        stored = await self._call(self._put(
            keys=[_key(record.session_id), _LRU, _EXPIRY],
            args=[record.revision - 1, record.to_bytes(), meta, record.last_used_at, record.expires_at,
                  record.session_id]), "writing")
        if not stored:
            self._cache.pop(record.session_id, None)
            raise StoreConflict(f"session {record.session_id} changed since revision {record.revision - 1}")
        self._remember(record)

    async def delete(self, session_id: str, why: str = "was closed") -> None:
        self._cache.pop(session_id, None)
        await self._call(self._delete(keys=[_key(session_id), _LRU, _EXPIRY, _ENDED, _WHY, _SEQ],
                                      args=[session_id, why, self.tombstones, ""]), "writing")

    async def expire(self, session_id: str, why: str, now: float) -> bool:
        self._cache.pop(session_id, None)
        return bool(await self._call(self._delete(keys=[_key(session_id), _LRU, _EXPIRY, _ENDED, _WHY, _SEQ],
                                                  args=[session_id, why, self.tombstones, repr(now)]), "writing"))

    async def ended(self, session_id: str) -> str | None:
        why = await self._call(self._redis.hget(_WHY, session_id), "reading")
        return None if why is None else why.decode()

    async def sessions(self) -> list[StoredSession]:
        ids = [i.decode() for i in await self._call(self._redis.zrange(_LRU, 0, -1), "reading")]
        result = []
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            pipe = self._redis.pipeline(transaction=False)
            for session_id in chunk:
                pipe.hget(_key(session_id), "meta")
            metas = await self._call(pipe.execute(), "reading")
            result += [StoredSession(sid, *json.loads(meta)) for sid, meta in zip(chunk, metas, strict=True)
                       if meta is not None]
        return result

    async def count(self) -> int:
        return int(await self._call(self._redis.zcard(_LRU), "reading"))

    async def least_recently_used(self, limit: int) -> list[str]:
        return [i.decode() for i in await self._call(self._redis.zrange(_LRU, 0, limit - 1), "reading")]

    async def due(self, now: float, limit: int = 1000) -> list[str]:
        ids = await self._call(self._redis.zrangebyscore(_EXPIRY, "-inf", now, start=0, num=limit), "reading")
        return [i.decode() for i in ids]

    async def _call(self, awaitable, doing: str):
        try:
            return await awaitable
        except self._errors as error:
            raise StoreUnavailable(f"{self._setting} {self.url}: {doing} failed: {error}") from None


def _key(session_id: str) -> str:
    return f"{PREFIX}session:{session_id}"
