"""server/sessions/policy.py by itself (a real index and real stores, no engine): what a store of this
process's own decides from the index, and what a store shared by replicas decides from the stored times
and count. Two replicas are two indexes with a policy each over one redis-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.errors import FailedPrecondition, NotFound, ResourceExhausted
from server.metrics import Metrics
from server.sessions.index import EXPIRED, MODEL_REMOVED, SessionIndex
from server.sessions.policy import LocalPolicy, SharedPolicy, policy_for
from server.sessions.record import SessionRecord
from server.sessions.store import InMemorySessionStore, MeasuredStore
from server.sessions.stores import open_store


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def record(session_id: str, used: float, ttl: int = 10) -> SessionRecord:
    state = (np.zeros((1, 1, 4), np.float32),)
    return SessionRecord(session_id, "m", 1, state, [1, 2], 1, ttl, used, used)


class Replica:
    """One process's index and policy over `store`."""

    def __init__(self, store, clock: Clock, max_sessions: int = 100):
        self.prom = CollectorRegistry()
        self.index = SessionIndex(Metrics(self.prom), max_sessions, tombstones=100)
        self.store = store
        self.policy = policy_for(store, self.index, max_sessions, clock)

    async def create(self, session_id: str, used: float, ttl: int = 10) -> SessionRecord:
        """A new session the way the manager admits one."""
        await self.policy.make_room()
        made = record(session_id, used, ttl)
        await self.store.put(made)
        self.index.add(made)
        return made

    def evicted(self, reason: str) -> float:
        return self.prom.get_sample_value("seqserve_sessions_evicted_total", {"model": "m", "reason": reason}) or 0.0


def run(body):
    asyncio.run(body())


def run_shared(redis_url: str, body):
    """`await body(store, clock)` over a fresh redis-server's store, opened and closed around it."""
    async def go():
        store = open_store(redis_url)
        await store.open()
        try:
            await body(store, Clock())
        finally:
            await store.close()

    asyncio.run(go())


@pytest.fixture
def redis_url(redis_server):
    redis_server.flush()
    return redis_server.url


def test_the_policy_follows_whether_the_store_is_shared(redis_url):
    index = SessionIndex(Metrics(CollectorRegistry()), 10, 10)
    assert type(policy_for(InMemorySessionStore(), index, 10, Clock())) is LocalPolicy
    assert type(policy_for(open_store("sqlite::memory:"), index, 10, Clock())) is LocalPolicy
    redis = open_store(redis_url)
    assert type(policy_for(redis, index, 10, Clock())) is SharedPolicy
    assert type(policy_for(MeasuredStore(redis, Metrics(CollectorRegistry())), index, 10, Clock())) is SharedPolicy


# --- a store of this process's own ------------------------------------------------------------------------


def test_local_start_up_adopts_what_is_stored_and_ends_what_expired_meanwhile():
    async def body():
        clock, store = Clock(), InMemorySessionStore()
        await store.put(record("fresh", used=995.0))
        await store.put(record("stale", used=980.0))  # idle 20 s of its 10
        replica = Replica(store, clock)
        await replica.policy.adopt_stored()
        assert "fresh" in replica.index and "stale" not in replica.index
        assert replica.index.why_ended("stale").startswith("expired") and await store.ended("stale")
        assert await store.count() == 1 and replica.evicted(EXPIRED) == 1

    run(body)


def test_local_expiry_on_use_and_by_sweep_spares_busy_sessions():
    async def body():
        clock, store = Clock(), InMemorySessionStore()
        replica = Replica(store, clock)
        for sid in ("a", "b", "c"):
            await replica.create(sid, used=1_000.0)
        clock.now = 1_011.0
        turn = replica.index.get("b").line.join()  # an operation in progress on b
        with pytest.raises(NotFound, match="expired: it was idle for longer than its TTL of 10 s"):
            replica.policy.expire_if_idle("a", replica.index.get("a"))
        replica.policy.expire_if_idle("b", replica.index.get("b"))  # busy: stays
        assert await replica.policy.sweep() == 1  # c; b is busy
        assert len(replica.index) == 1 and "b" in replica.index
        await replica.policy.drain()  # the deletes of sessions ended from synchronous code landed
        assert await store.ids() == ["b"] and replica.evicted(EXPIRED) == 2
        turn.release()

    run(body)


def test_local_cap_evicts_the_least_recently_used_idle_session_or_refuses():
    async def body():
        clock, store = Clock(), InMemorySessionStore()
        replica = Replica(store, clock, max_sessions=2)
        await replica.create("old", used=1_000.0)
        await replica.create("new", used=1_001.0)
        turns = [replica.index.get("old").line.join()]  # busy: the next least recently used goes
        await replica.create("third", used=1_002.0)
        await replica.policy.drain()
        assert sorted(await store.ids()) == ["old", "third"]
        assert replica.index.why_ended("new").startswith("was evicted: the server holds at most 2 sessions")
        turns.append(replica.index.get("third").line.join())
        with pytest.raises(ResourceExhausted, match="at most 2 sessions and every one is busy"):
            await replica.create("fourth", used=1_003.0)
        for turn in turns:
            turn.release()

    run(body)


def test_local_a_version_gone_from_the_repository_ends_the_session():
    async def body():
        clock, store = Clock(), InMemorySessionStore()
        replica = Replica(store, clock)
        made = await replica.create("a", used=1_000.0)
        error = await replica.policy.version_missing(made)
        assert isinstance(error, NotFound) and "left the repository" in str(error)
        assert "a" not in replica.index and await store.get("a") is None
        assert replica.evicted(MODEL_REMOVED) == 1

    run(body)


# --- a store shared by replicas ---------------------------------------------------------------------------


def test_shared_start_up_adopts_nothing_and_a_missing_version_leaves_the_session(redis_url):
    async def body(store, clock):
        await store.put(record("a", used=1_000.0))
        replica = Replica(store, clock)
        await replica.policy.adopt_stored()
        assert len(replica.index) == 0  # adopted when first used (the manager's ensure)
        error = await replica.policy.version_missing(await store.get("a"))
        assert isinstance(error, FailedPrecondition) and "send it to a replica that does" in str(error)
        assert await store.get("a") is not None

    run_shared(redis_url, body)


def test_shared_stored_times_are_the_truth(redis_url):
    async def body(store, clock):
        here = Replica(store, clock)
        made = await here.create("a", used=1_000.0)
        await store.put(made.touched(1_008.0))  # another replica used it: the index here is stale
        clock.now = 1_012.0  # past the TTL by this replica's index, not by the store
        live = here.index.get("a")
        here.policy.expire_if_idle("a", live)  # never decided from this index
        turn = live.line.join()
        await here.policy.refresh("a", live, await store.get("a"))
        assert live.last_used_at == 1_008.0
        clock.now = 1_020.0
        with pytest.raises(NotFound, match="expired"):
            await here.policy.refresh("a", live, await store.get("a"))
        assert await store.get("a") is None and "a" not in here.index
        turn.release()

    run_shared(redis_url, body)


def test_shared_expiry_waits_while_another_operation_is_queued_here(redis_url):
    async def body(store, clock):
        replica = Replica(store, clock)
        await replica.create("a", used=1_000.0)
        clock.now = 1_020.0
        live = replica.index.get("a")
        turns = [live.line.join(), live.line.join()]  # this operation, and one queued behind it
        stored = await store.get("a")
        await replica.policy.refresh("a", live, stored)  # still in use here: not expired
        assert await store.get("a") is not None
        for turn in turns:
            turn.release()

    run_shared(redis_url, body)


def test_shared_sweep_expires_every_replicas_sessions_and_unindexes_idle_ones_here(redis_url):
    async def body(store, clock):
        here, there = Replica(store, clock), Replica(store, clock)
        await there.create("theirs", used=1_000.0)
        mine = await here.create("mine", used=1_000.0, ttl=100)
        await here.create("busy", used=1_000.0)
        turn = here.index.get("busy").line.join()
        clock.now = 1_011.0
        assert await here.policy.sweep() == 1  # theirs; busy is in use here
        assert here.index.why_ended("theirs").startswith("expired") and here.evicted(EXPIRED) == 1
        assert await store.get("theirs") is None and await store.get("busy") is not None
        turn.release()
        await store.put(mine.touched(1_090.0))  # used on the other replica since
        clock.now = 1_101.0  # idle past its TTL by this index, not by the store
        await here.policy.sweep_periodically()  # expires busy (now idle); drops mine from the index only
        assert len(here.index) == 0 and here.index.why_ended("mine") is None
        assert await store.ids() == ["mine"]

    run_shared(redis_url, body)


def test_shared_cap_counts_the_stores_sessions(redis_url):
    async def body(store, clock):
        here, there = Replica(store, clock, max_sessions=2), Replica(store, clock, max_sessions=2)
        await there.create("theirs", used=1_000.0)
        await here.create("mine", used=1_001.0)
        turn = here.index.get("mine").line.join()
        await here.create("third", used=1_002.0)  # the store is full: the other replica's session goes
        assert sorted(await store.ids()) == ["mine", "third"]
        assert (await store.ended("theirs")).startswith("was evicted")
        turns = [turn, here.index.get("third").line.join()]
        with pytest.raises(ResourceExhausted, match="the session store holds at most 2 sessions"):
            await here.create("fourth", used=1_003.0)
        for turn in turns:
            turn.release()

    run_shared(redis_url, body)
