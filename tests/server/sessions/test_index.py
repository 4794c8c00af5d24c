"""server/sessions/index.py: the open sessions of one process, by themselves (no store, no engine): least
recently used order, what is due at a time, busy sessions skipped, bounded tombstones, and the gauges."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.sessions.index import CLOSED, EVICTED, EXPIRED, SessionIndex
from server.sessions.store import StoredSession


def session(session_id: str, last_used_at: float, ttl: int = 10, model: str = "m", state_bytes: int = 100):
    return StoredSession(session_id, model, 1, ttl, last_used_at, last_used_at, state_bytes)


def index(max_sessions: int = 100, tombstones: int = 3) -> tuple[SessionIndex, CollectorRegistry]:
    prom = CollectorRegistry()
    return SessionIndex(Metrics(prom), max_sessions, tombstones), prom


def gauges(prom: CollectorRegistry, model: str = "m") -> tuple[float, float]:
    return (prom.get_sample_value("seqserve_sessions_active", {"model": model}),
            prom.get_sample_value("seqserve_session_state_bytes", {"model": model}))


def evicted(prom: CollectorRegistry, reason: str) -> float:
    return prom.get_sample_value("seqserve_sessions_evicted_total", {"model": "m", "reason": reason}) or 0.0


def test_due_yields_idle_sessions_past_their_ttl_in_deadline_order():
    idx, prom = index()
    for sid, used in (("b", 5.0), ("a", 0.0), ("c", 20.0), ("d", 1.0)):
        idx.add(session(sid, used))
    assert gauges(prom) == (4, 400)
    assert list(idx.due(9.9)) == []
    idx.touch("d", 6.0)  # used since it was indexed: its deadline moved to 16
    due = []
    for sid in idx.due(15.0):
        assert sid in idx  # still indexed as it is yielded: the caller ends it (the index ends nothing)
        due.append(sid)
        idx.forget(sid, EXPIRED)
    assert due == ["a", "b"]
    assert list(idx.due(15.5)) == []
    assert list(idx.due(16.0)) == ["d"]


def test_a_busy_session_is_not_due_and_is_looked_at_again_a_ttl_later():
    async def main():
        idx, _ = index()
        idx.add(session("a", 0.0))
        turn = idx.get("a").line.join()
        await turn.__aenter__()
        assert list(idx.due(11.0)) == []  # in the middle of an operation
        await turn.__aexit__(None, None, None)
        assert list(idx.due(20.0)) == []  # looked at again at 11 + 10
        assert list(idx.due(21.0)) == ["a"]

    asyncio.run(main())


def test_least_recently_used_idle_skips_busy_sessions_and_follows_touches():
    async def main():
        idx, _ = index()
        for sid in "abc":
            idx.add(session(sid, 0.0))
        assert idx.least_recently_used_idle() == "a"
        idx.touch("a", 1.0)
        assert idx.least_recently_used_idle() == "b"
        turn = idx.get("b").line.join()
        assert idx.least_recently_used_idle() == "c"  # b has an operation in progress
        await turn.__aenter__()
        await turn.__aexit__(None, None, None)
        assert idx.least_recently_used_idle() == "b"

    asyncio.run(main())


def test_forget_counts_evictions_keeps_the_gauges_and_remembers_why():
    idx, prom = index(max_sessions=2)
    for sid in "abcd":
        idx.add(session(sid, 0.0))
    idx.resize("a", 250)
    assert gauges(prom) == (4, 550)
    assert idx.forget("a", EXPIRED) == "expired: it was idle for longer than its TTL of 10 s"
    assert idx.forget("b", EVICTED).startswith("was evicted: the server holds at most 2 sessions")
    assert idx.forget("c", CLOSED) == "was closed"
    assert idx.forget("d", None, "is no longer stored") == "is no longer stored"
    assert idx.forget("a", EXPIRED) is None  # not indexed any more
    assert gauges(prom) == (0, 0)
    assert (evicted(prom, EXPIRED), evicted(prom, EVICTED), evicted(prom, CLOSED)) == (1, 1, 0)
    assert idx.why_ended("c") == "was closed" and "a" not in idx


def test_tombstones_are_bounded_oldest_first():
    idx, _ = index(tombstones=3)
    for i in range(5):
        idx.remember_end(f"s{i}", f"why {i}")
    assert [idx.why_ended(f"s{i}") for i in range(5)] == [None, None, "why 2", "why 3", "why 4"]


def test_unindex_idle_drops_without_ending_or_counting():
    idx, prom = index()
    idx.add(session("a", 0.0))
    idx.add(session("b", 8.0))
    idx.unindex_idle(12.0)
    assert "a" not in idx and "b" in idx
    assert idx.why_ended("a") is None  # not ended: another replica may be using it
    assert gauges(prom) == (1, 100) and evicted(prom, EXPIRED) == 0
