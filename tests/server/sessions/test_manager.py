"""server/sessions/manager.py on a real engine (tiny LSTM bundle) with a clock the tests move: TTL and its
bookkeeping, busy sessions, tombstones, a version leaving the repository, a serialising store."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from server.decoding import DecodingParams
from server.decoding.limits import RequestLimits
from server.engine import EngineConfig, FinishEvent, GenerationRequest
from server.errors import NotFound
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.sessions import InMemorySessionStore, SessionLimits, SessionManager

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def repository(lm_repository):
    return lm_repository


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """A registry whose versions can be made to leave the repository."""

    def __init__(self, registry: ModelRegistry):
        self.inner, self.gone = registry, False

    async def get(self, name, version=0):
        if self.gone:
            raise NotFound(f"model {name!r} has no version {version}")
        return await self.inner.get(name, version)

ENDLESS_TOKENS = 1_000_000  # no machine reaches it before the test ends the generation


def run(repository, body, limits: SessionLimits | None = None, store=None):
    async def go():
        prom = CollectorRegistry()
        metrics = Metrics(prom)
        config = EngineConfig(limits=RequestLimits(max_new_tokens=ENDLESS_TOKENS))
        registry = ModelRegistry(repository, config=config, metrics=metrics,
                                 session_options={"intra_op_num_threads": 1})
        await registry.start()
        clock = Clock()
        manager = SessionManager(Registry(registry), limits, store=store, metrics=metrics, clock=clock)
        try:
            return await body(manager, clock, prom)
        finally:
            await manager.stop()
            await registry.stop(1.0)

    return asyncio.run(go())


async def events(generation) -> tuple[list[int], FinishEvent]:
    tokens, finish = [], None
    async for event in generation:
        if isinstance(event, FinishEvent):
            finish = event
        else:
            tokens += event.token_ids
    return tokens, finish


def test_a_serialising_store_serves_sessions_that_decode_as_one_generation(repository):
    greedy = DecodingParams(max_new_tokens=20, min_new_tokens=20)

    async def body(manager, clock, prom):
        session = await manager.create("tiny-lm", 0, "the c")
        await manager.feed(session.session_id, "at")
        engine = await manager.registry.get("tiny-lm")
        ids = [1, *engine.bundle.tokenizer("text").encode("the cat").ids]
        whole = await engine.submit(GenerationRequest("whole", ids, greedy)).result()
        fork = await manager.fork(session.session_id)
        tokens, finish = await events(manager.generate(session.session_id, greedy))
        assert tokens == whole.generated_ids and finish.text == whole.text
        assert (await manager.get(session.session_id)).tokens_consumed == 7 + 20
        assert (await events(manager.generate(fork.session_id, greedy)))[0] == whole.generated_ids

    run(repository, body, store=InMemorySessionStore(serialize=True))


def test_a_generation_taken_in_batches_gives_what_piled_up(repository):
    greedy = DecodingParams(max_new_tokens=12, min_new_tokens=12)

    async def body(manager, clock, prom):
        a = (await manager.create("tiny-lm", 0, "the cat")).session_id
        b = (await manager.fork(a)).session_id
        tokens, finish = await events(manager.generate(a, greedy))
        generation = manager.generate(b, greedy)
        await generation.ready()
        await asyncio.sleep(0.5)  # the reader is away: the engine's events pile up
        batches = []
        while batch := await generation.next_batch():
            batches.append(batch)
        assert max(len(batch) for batch in batches) > 1 and isinstance(batches[-1][-1], FinishEvent)
        events_b = [event for batch in batches for event in batch]
        assert [t for event in events_b[:-1] for t in event.token_ids] == tokens
        assert events_b[-1].text == finish.text and await generation.next_batch() == []
        await generation.task
        assert (await manager.get(b)).tokens_consumed == (await manager.get(a)).tokens_consumed

    run(repository, body)


def test_sessions_expire_after_their_idle_ttl_unless_busy(repository):
    endless = DecodingParams(max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)  # ended by the test

    async def body(manager, clock, prom):
        def expired() -> float:
            return prom.get_sample_value("seqserve_sessions_evicted_total",
                                         {"model": "tiny-lm", "reason": "expired"}) or 0.0

        a = (await manager.create("tiny-lm", prefix="the")).session_id
        clock.now += 5
        await manager.feed(a, " cat")  # used: its 10 s start again
        clock.now += 7
        assert await manager.sweep() == 0 and (await manager.get(a)).idle_seconds == 7
        clock.now += 4
        assert await manager.sweep() == 1 and expired() == 1 and len(manager) == 0
        with pytest.raises(NotFound, match="expired: it was idle for longer than its TTL of 10 s"):
            await manager.get(a)

        b = (await manager.create("tiny-lm", prefix="a")).session_id
        generation = manager.generate(b, endless)
        await generation.__anext__()  # running
        clock.now += 100
        assert await manager.sweep() == 0 and (await manager.get(b)).generating  # never mid-operation
        generation.cancel()
        tokens, finish = await events(generation)
        await generation.task
        assert finish is None or finish.reason.value == "cancelled"
        clock.now += 9  # idle since the generation ended
        assert await manager.sweep() == 0
        clock.now += 2
        assert await manager.sweep() == 1 and expired() == 2
        assert prom.get_sample_value("seqserve_sessions_active", {"model": "tiny-lm"}) == 0
        assert prom.get_sample_value("seqserve_session_state_bytes", {"model": "tiny-lm"}) == 0

    run(repository, body, SessionLimits(default_ttl_seconds=10, max_ttl_seconds=60))


def test_a_generation_abandoned_before_its_turn_changes_nothing(repository):
    async def body(manager, clock, prom):
        session_id = (await manager.create("tiny-lm", prefix="the")).session_id
        holder = manager._join(session_id)  # an operation in progress
        await holder.__aenter__()
        generation = manager.generate(session_id, DecodingParams(max_new_tokens=5))
        fed = asyncio.create_task(manager.feed(session_id, " cat"))  # acknowledged after the generation
        generation.cancel()
        await holder.__aexit__(None, None, None)
        with pytest.raises(asyncio.CancelledError):
            await generation.ready()
        assert (await fed).tokens_consumed == 3 + 4  # the feed ran after it, on the unchanged session
        assert not (await manager.get(session_id)).generating

    run(repository, body)


def test_tombstones_are_bounded_and_say_why(repository):
    async def body(manager, clock, prom):
        ids = [(await manager.create("tiny-lm")).session_id for _ in range(3)]
        for session_id in ids:
            await manager.close(session_id)
        with pytest.raises(NotFound, match="unknown session"):
            await manager.get(ids[0])  # forgotten: only the last two ended ids are remembered
        for session_id in ids[1:]:
            with pytest.raises(NotFound, match="was closed"):
                await manager.feed(session_id, "a")

    run(repository, body, SessionLimits(tombstones=2))


def test_a_version_that_left_the_repository_ends_its_sessions(repository):
    async def body(manager, clock, prom):
        session_id = (await manager.create("tiny-lm", prefix="the")).session_id
        manager.registry.gone = True
        for _ in range(2):
            with pytest.raises(NotFound, match="model tiny-lm version 1, which it was bound to, left the repository|"
                                               "ended: model tiny-lm version 1 left the repository"):
                await manager.feed(session_id, " cat")
        assert prom.get_sample_value("seqserve_sessions_evicted_total",
                                     {"model": "tiny-lm", "reason": "model_removed"}) == 1
        assert len(manager) == 0

    run(repository, body)


def test_a_session_keeps_a_bounded_tail_of_its_text(repository):
    greedy = DecodingParams(max_new_tokens=20, min_new_tokens=20)

    async def body(manager, clock, prom):
        session = await manager.create("tiny-lm", 0, "the cat sat on the mat")
        await manager.feed(session.session_id, " and a dog")
        tokens, _ = await events(manager.generate(session.session_id, greedy))
        record = await manager.record_of(session.session_id)
        assert len(record.history) == 8 and record.tokens_consumed == 32 + 20
        engine = await manager.registry.get("tiny-lm")
        ids = [1, *engine.bundle.tokenizer("text").encode("the cat sat on the mat and a dog").ids]
        whole = await engine.submit(GenerationRequest("whole", ids, DecodingParams(max_new_tokens=40,
                                                                                   min_new_tokens=40))).result()
        assert tokens == whole.generated_ids[:20]  # without penalties the tail is all a continuation needs
        assert record.history.tolist() == whole.generated_ids[12:20]

    run(repository, body, SessionLimits(history_tokens=8))
