"""A server restarted on the same store (a real SQLite file, a real redis-server) serves every session in
it: the text continues token for token, TTL is wall-clock (a session idle past its TTL while the server
was down is "expired"), why a session ended is told after the restart, and the cap counts the store."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from server.decoding import DecodingParams
from server.engine import FinishEvent, GenerationRequest
from server.errors import FailedPrecondition, NotFound
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.sessions import SessionLimits, SessionManager
from server.sessions.stores import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = DecodingParams(max_new_tokens=15, min_new_tokens=15)
T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:{tmp_path}/sessions.db"
    server = request.getfixturevalue("redis_server")
    server.flush()
    return server.url


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def generated(generation) -> list[int]:
    tokens = []
    async for event in generation:
        if not isinstance(event, FinishEvent):
            tokens += event.token_ids
    return tokens


def lifetime(repository, url, body, now: float, limits: SessionLimits | None = None):
    """One server process's life: a registry and a manager on the store at `url`, `body(manager)`, stop."""
    async def go():
        metrics = Metrics(CollectorRegistry())
        registry = ModelRegistry(repository, metrics=metrics, session_options={"intra_op_num_threads": 1})
        await registry.start()
        manager = SessionManager(registry, limits, store=open_store(url), metrics=metrics, clock=Clock(now))
        await manager.start()
        try:
            return await body(manager)
        finally:
            await manager.stop()
            await registry.stop(1.0)

    return asyncio.run(go())


def test_a_restarted_server_serves_every_session_of_its_store(lm_repository, store_url):
    async def first(manager):
        a = await manager.create("tiny-lm", 0, "the c", ttl_seconds=3600)
        await manager.feed(a.session_id, "at")
        short = await manager.create("tiny-lm", 0, "a dog", ttl_seconds=10)
        closed = await manager.create("tiny-lm", 0, "x")
        await manager.close(closed.session_id)
        fork = await manager.fork(a.session_id, ttl_seconds=3600)
        engine = await manager.registry.get("tiny-lm")
        ids = [1, *engine.bundle.tokenizer("text").encode("the cat").ids]
        whole = await engine.submit(GenerationRequest("whole", ids, GREEDY)).result()
        return a.session_id, short.session_id, closed.session_id, fork.session_id, whole.generated_ids

    a, short, closed, fork, reference = lifetime(lm_repository, store_url, first, T0)

    async def second(manager):  # 60 s later: `short` ran out of idle time while the server was down
        info = await manager.get(a)
        assert (info.tokens_consumed, info.model, info.version) == (7, "tiny-lm", 1)
        assert await generated(manager.generate(a, GREEDY)) == reference
        assert (await manager.get(a)).tokens_consumed == 7 + 15
        await manager.ensure(fork)  # a shared store's session this process has not seen yet
        assert await generated(manager.generate(fork, GREEDY)) == reference
        with pytest.raises(NotFound, match="expired: it was idle for longer than its TTL of 10 s"):
            await manager.get(short)
        with pytest.raises(NotFound, match="was closed"):
            await manager.feed(closed, "more")
        with pytest.raises(NotFound, match="unknown session"):
            await manager.get("f" * 32)

    lifetime(lm_repository, store_url, second, T0 + 60)

    async def third(manager):  # the generation of the second life was kept; the reasons are still told
        assert (await manager.get(a)).tokens_consumed == 7 + 15
        with pytest.raises(NotFound, match="was closed"):
            await manager.get(closed)
        with pytest.raises(NotFound, match="expired"):
            await manager.get(short)

    lifetime(lm_repository, store_url, third, T0 + 120)


def test_the_cap_counts_the_stores_sessions(lm_repository, store_url):
    limits = SessionLimits(max_sessions=3)

    async def first(manager):
        ids = []
        for _ in range(3):
            manager.clock.now += 1
            ids.append((await manager.create("tiny-lm", 0, "a", ttl_seconds=3600)).session_id)
        return ids

    ids = lifetime(lm_repository, store_url, first, T0, limits)

    async def second(manager):
        await manager.feed(ids[0], "b")  # ids[1] is now the least recently used
        await manager.create("tiny-lm", 0, "c")
        with pytest.raises(NotFound, match="was evicted"):
            await manager.get(ids[1])
        assert (await manager.get(ids[0])).tokens_consumed == 2
        assert await manager.store.count() == 3

    lifetime(lm_repository, store_url, second, T0 + 10, limits)


def test_a_session_of_another_bundle_is_refused_naming_it(lm_repository, store_url):
    async def first(manager):
        session = await manager.create("tiny-lm", 0, "the")
        record = await manager.store.get(session.session_id)
        from dataclasses import replace

        await manager.store.put(replace(record, checksum="0123456789abcdef", revision=record.revision + 1))
        return session.session_id

    session_id = lifetime(lm_repository, store_url, first, T0)

    async def second(manager):
        with pytest.raises(FailedPrecondition, match="checksum 0123456789abcdef"):
            await manager.feed(session_id, "x")

    lifetime(lm_repository, store_url, second, T0 + 1)


def test_store_calls_are_timed_and_a_store_gone_away_is_unavailable(lm_repository, tmp_path):
    from bench.services import RedisServer
    from server.errors import Unavailable

    redis = RedisServer(tmp_path)

    async def go():
        prom = CollectorRegistry()
        metrics = Metrics(prom)
        registry = ModelRegistry(lm_repository, metrics=metrics, session_options={"intra_op_num_threads": 1})
        await registry.start()
        manager = SessionManager(registry, store=open_store(redis.url), metrics=metrics)
        await manager.start()
        try:
            session = await manager.create("tiny-lm", 0, "the")
            await manager.feed(session.session_id, " cat")
            assert prom.get_sample_value("seqserve_session_store_seconds_count", {"op": "put"}) == 2
            assert prom.get_sample_value("seqserve_session_store_seconds_count", {"op": "get"}) >= 1
            redis.stop()
            with pytest.raises(Unavailable, match=f"session store is unavailable: session_store {redis.url}"):
                await manager.get(session.session_id)  # reads the store
            assert prom.get_sample_value("seqserve_session_store_errors_total", {"op": "get"}) == 1
            with pytest.raises(Unavailable, match="session store is unavailable"):
                await manager.feed(session.session_id, " sat")  # starts from this replica's copy; the write fails
            assert prom.get_sample_value("seqserve_session_store_errors_total", {"op": "put"}) == 1
        finally:
            await manager.stop()
            await registry.stop(1.0)

    try:
        asyncio.run(go())
    finally:
        if redis.process.poll() is None:
            redis.stop()
