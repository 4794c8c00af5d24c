"""The scheduler's bookkeeping on an explicit clock: deadlines of queued and running requests, and no
memory kept for requests that ended."""

from __future__ import annotations

from server.decoding import DecodingParams
from server.decoding.limits import RequestLimits
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


# --- priorities, preemption by parking, aging ---------------------------------------------------------

STRICT = EngineConfig(max_rows=1, priority_aging_seconds=0)  # no aging: the order is priority, then arrival


def request(scheduler: Scheduler, priority: int, at: float = 0.0, params: DecodingParams = PARAMS, rows: int = 1,
            deadline: float | None = None) -> Entry:
    slot = scheduler.new_slot()
    request = GenerationRequest(f"r{slot}", [1, 2], params, deadline=deadline, priority=priority)
    e = Entry(slot=slot, request=request, params=params, rows=rows, input_tokens=2, enqueued_at=at, priority=priority)
    scheduler.add(e)
    return e


def test_higher_priorities_run_first_and_park_lower_ones_which_resume_first_among_equals():
    scheduler = Scheduler(STRICT)
    low = request(scheduler, 0)
    assert scheduler.plan(now=0.0).admit == [low]
    later_low, mid, mid2, high = (request(scheduler, p) for p in (0, 3, 3, 5))
    plan = scheduler.plan(now=1.0)
    assert plan.park == [low] and plan.admit == [high] and low.stage is Stage.PARKED
    assert scheduler.parked_rows == 1 and scheduler.active_rows == 1 and scheduler.queued == 3
    assert not scheduler.plan(now=2.0).admit  # the row is taken by a request nobody waiting outranks
    order = []
    for now in (3.0, 4.0, 5.0, 6.0):
        scheduler.finish(next(iter(scheduler.active)))
        plan = scheduler.plan(now=now)
        order.extend(plan.admit + plan.resume)
        assert not plan.park
    # Among equal priorities the earlier arrival first: the parked request before the one that came after it.
    assert order == [mid, mid2, low, later_low]
    assert low.admitted_at == 0.0  # resuming is not a new admission


def test_victims_are_the_lowest_then_the_latest_admitted_and_never_beams():
    scheduler = Scheduler(EngineConfig(max_rows=5, priority_aging_seconds=0))
    beam = DecodingParams(strategy="beam", beam_size=2, max_new_tokens=8)
    first, second, other = request(scheduler, 0), request(scheduler, 0), request(scheduler, 1)
    beams = request(scheduler, -5, params=beam, rows=2)
    assert len(scheduler.plan(now=0.0).admit) == 4
    high = request(scheduler, 2, rows=2, params=beam)  # needs two rows: the two priority-0 rows, latest first
    plan = scheduler.plan(now=1.0)
    assert plan.park == [second, first] and plan.admit == [high]
    # Nothing is parked unless enough rows of a lower priority free up: the beam rows never do.
    higher = request(scheduler, 3, rows=3, params=beam)
    plan = scheduler.plan(now=2.0)
    assert not plan.park and not plan.admit and higher.stage is Stage.QUEUED
    assert other.stage is Stage.ACTIVE and beams.stage is Stage.ACTIVE


def test_a_parked_request_can_be_cancelled_or_expire():
    scheduler = Scheduler(STRICT)
    low = request(scheduler, 0, deadline=50.0)
    scheduler.plan(now=0.0)
    request(scheduler, 1)
    assert scheduler.plan(now=1.0).park == [low]
    plan = scheduler.plan(now=50.0)
    assert plan.expired == [low] and plan.dropped_slots() == [low.slot]
    assert scheduler.parked_rows == 0 and not scheduler.parked and low.stage is Stage.DONE

    cancelled = request(scheduler, -1)
    scheduler.finish(next(iter(scheduler.active)))
    scheduler.plan(now=51.0)
    request(scheduler, 0)
    assert scheduler.plan(now=52.0).park == [cancelled]
    scheduler.cancel(cancelled.slot)
    plan = scheduler.plan(now=53.0)
    assert plan.drop == [cancelled] and plan.dropped_slots() == [cancelled.slot] and not scheduler.parked
    scheduler.finish(next(iter(scheduler.active)))
    assert scheduler.idle


def test_aging_lifts_a_waiting_request_one_level_per_period_up_to_the_top():
    config = EngineConfig(max_rows=1, limits=RequestLimits(max_priority=4), priority_aging_seconds=10)
    scheduler = Scheduler(config)
    high = request(scheduler, 3)
    scheduler.plan(now=0.0)
    low = request(scheduler, 0, at=0.0)
    assert scheduler.effective_priority(low, 25.0) == 2
    assert not scheduler.plan(now=39.0).park  # 3 levels earned: not above the running 3
    plan = scheduler.plan(now=40.0)  # 4 > 3: the request that waited parks the one that runs
    assert plan.park == [high] and plan.admit == [low] and low.running_priority == 4
    # The top is the top: waiting no longer lifts it above max_priority, so nothing parks `low` now.
    assert scheduler.effective_priority(high, 1000.0) == 4 and not scheduler.plan(now=1000.0).park
    newcomer = request(scheduler, 4, at=1000.0)
    assert not scheduler.plan(now=1001.0).park
    scheduler.finish(low.slot)
    assert scheduler.plan(now=1002.0).resume == [high]  # it arrived before the newcomer of the same level
    assert newcomer.stage is Stage.QUEUED


def test_equal_priorities_take_turns_once_waiting_has_lifted_them():
    """Endless rows of one priority and more waiting than rows: waiting earns a level, so the waiting ones
    park the running ones one aging period later, which then wait their turn: nobody starves."""
    scheduler = Scheduler(EngineConfig(max_rows=2, priority_aging_seconds=5))
    first = [request(scheduler, 0) for _ in range(2)]
    scheduler.plan(now=0.0)
    then = [request(scheduler, 0, at=1.0) for _ in range(2)]
    assert not scheduler.plan(now=5.9).park
    plan = scheduler.plan(now=6.0)
    assert set(plan.park) == set(first) and plan.admit == then
    plan = scheduler.plan(now=16.0)  # first, parked at 6 at level 0, has waited 10 s: 2 > 1
    assert set(plan.park) == set(then) and set(plan.resume) == set(first)
