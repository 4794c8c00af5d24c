"""The scheduler's bookkeeping on an explicit clock: deadlines of queued and running requests, and no
memory kept for requests that ended."""

from __future__ import annotations

from server.decoding import DecodingParams
from server.engine.config import EngineConfig
from server.engine.requests import GenerationRequest
from server.engine.scheduler import Entry, Scheduler, Stage

PARAMS = DecodingParams(max_new_tokens=8)


def entry(scheduler: Scheduler, deadline: float | None) -> Entry:
    slot = scheduler.new_slot()
    request = GenerationRequest(f"r{slot}", [1, 2], PARAMS, deadline=deadline)
    return Entry(slot=slot, request=request, params=PARAMS, rows=1, input_tokens=2, enqueued_at=0.0)


def test_a_deadline_ends_a_running_request_and_a_queued_one():
    scheduler = Scheduler(EngineConfig(max_rows=1))
    running, waiting = entry(scheduler, 10.0), entry(scheduler, 20.0)
    scheduler.add(running)
    scheduler.add(waiting)
    plan = scheduler.plan(now=0.0)
    assert plan.admit == [running] and scheduler.queued == 1

    plan = scheduler.plan(now=10.0)
    assert plan.expired == [running] and plan.dropped_slots() == [running.slot]
    assert plan.admit == [waiting]  # the expired request's row went to the next one at once

    plan = scheduler.plan(now=25.0)
    assert plan.expired == [waiting] and scheduler.idle
    assert scheduler.tracked_deadlines == 0


def test_ended_requests_leave_nothing_in_the_deadline_heap():
    scheduler = Scheduler(EngineConfig(max_rows=4, max_queued=100_000))
    live = []
    for i in range(10_000):
        e = entry(scheduler, 3600.0)
        scheduler.add(e)
        scheduler.plan(now=float(i) / 1000)
        if i % 100 == 0:
            live.append(e)  # a few stay active a while
            if len(live) > 2:
                scheduler.finish(live.pop(0).slot)
        else:
            scheduler.finish(e.slot)
        assert scheduler.tracked_deadlines <= 2 * len(scheduler.active) + 64
    assert all(e.stage is Stage.ACTIVE for e in live)
    for e in live:
        scheduler.finish(e.slot)
    assert scheduler.idle


def test_cancelled_queued_requests_release_their_deadline():
    scheduler = Scheduler(EngineConfig(max_rows=1, max_queued=100_000))
    holder = entry(scheduler, None)
    scheduler.add(holder)
    scheduler.plan(now=0.0)
    for _ in range(1_000):
        e = entry(scheduler, 3600.0)
        scheduler.add(e)
        scheduler.cancel(e.slot)
        plan = scheduler.plan(now=1.0)
        assert plan.withdrawn == [e]
    assert scheduler.queued == 0 and scheduler.tracked_deadlines <= 64


def test_a_request_cancelled_at_its_deadline_counts_as_expired():
    # gRPC cancels a handler whose deadline passed (often a moment before the server's own clock says so):
    # the engine ends it as expired, not as cancelled, so finished_total{reason="deadline"} counts it.
    scheduler = Scheduler(EngineConfig(max_rows=1))
    running, waiting, left = entry(scheduler, 10.0), entry(scheduler, 10.0), entry(scheduler, 100.0)
    for e in (running, waiting, left):
        scheduler.add(e)
    scheduler.plan(now=0.0)
    for e in (running, waiting, left):
        scheduler.cancel(e.slot)
    plan = scheduler.plan(now=9.99)
    assert {e.slot for e in plan.expired} == {running.slot, waiting.slot} and plan.withdrawn == [left]
    assert not plan.drop
    assert plan.dropped_slots() == [running.slot]
