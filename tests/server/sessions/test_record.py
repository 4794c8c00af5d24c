"""server/sessions/record.py and store.py: a parked session, its bytes, and the in-memory store."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.sessions import InMemorySessionStore, SessionFormatError, SessionRecord


def lstm_record(session_id: str = "ab" * 16, hidden: int = 512) -> SessionRecord:
    rng = np.random.default_rng(0)
    state = tuple(rng.standard_normal((1, 2, hidden), dtype=np.float32) for _ in range(2))
    return SessionRecord(session_id, "fortunes-lm", 3, state, [1, 40, 41, 42], tokens_consumed=3, ttl_seconds=600,
                         created_at=1_700_000_000.25, last_used_at=1_700_000_100.5, extra={"note": "é"})


def assert_same(a: SessionRecord, b: SessionRecord) -> None:
    fields = ("session_id", "model", "version", "tokens_consumed", "ttl_seconds", "created_at", "last_used_at", "extra")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert len(a.state) == len(b.state)
    for x, y in zip(a.state, b.state, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    assert a.history.dtype == b.history.dtype and np.array_equal(a.history, b.history)


def test_a_record_round_trips_through_bytes():
    record = lstm_record()
    data = record.to_bytes()
    back = SessionRecord.from_bytes(data)
    assert_same(record, back)
    assert (back.last_token_id, back.tokens_consumed, back.state_bytes) == (42, 3, 2 * 2 * 512 * 4)
    assert len(data) < back.state_bytes + 4 * 4 + 600  # the raw buffers and a small header
    assert all(s.flags.writeable and s.flags.c_contiguous for s in back.state)  # owned, not views of `data`
    assert not back.history.flags.writeable


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"NOPE" + d[4:], "not a serialised session"),
    (lambda d: d[:4] + (9).to_bytes(4, "little") + d[8:], "format 9"),
    (lambda d: d[:-10], "truncated"),
    (lambda d: d + b"xx", "past its tensors"),
    (lambda d: d[:6], "at least 12 bytes"),
])
def test_damaged_bytes_are_refused(damage, message):
    with pytest.raises(SessionFormatError, match=message):
        SessionRecord.from_bytes(damage(lstm_record().to_bytes()))


def test_advancing_and_copying_leave_the_original_alone():
    record = lstm_record()
    state = tuple(s + 1 for s in record.state)
    later = record.advanced(state, [7, 8], used_at=5.0)
    assert later.history.tolist() == [1, 40, 41, 42, 7, 8] and later.last_token_id == 8 and later.last_used_at == 5.0
    assert later.tokens_consumed == 5 and record.tokens_consumed == 3
    assert record.history.tolist() == [1, 40, 41, 42] and record.state[0] is not later.state[0]
    # A bounded history keeps the end of the text; the count goes on.
    kept = later.advanced(state, [9, 10, 11], used_at=6.0, keep=4)
    assert kept.history.tolist() == [8, 9, 10, 11] and kept.tokens_consumed == 8 and kept.last_token_id == 11
    assert kept.history.base is None  # its own small array, not a view keeping the long one alive

    fork = record.copy_as("cd" * 16, 30, now=9.0)
    assert (fork.session_id, fork.ttl_seconds, fork.created_at, fork.last_used_at) == ("cd" * 16, 30, 9.0, 9.0)
    assert fork.history is record.history  # read-only, so shared
    assert all(a is not b and np.array_equal(a, b) for a, b in zip(fork.state, record.state, strict=True))
    fork.state[0][...] = 0  # a fork's state is its own
    assert record.state[0].any()
    with pytest.raises(ValueError):
        record.history[0] = 5


@pytest.mark.parametrize("serialize", [False, True])
def test_the_in_memory_store(serialize):
    async def go():
        store = InMemorySessionStore(serialize=serialize)
        a, b = lstm_record("a" * 32, hidden=8), lstm_record("b" * 32, hidden=8)
        await store.put(a)
        await store.put(b)
        assert sorted(await store.ids()) == ["a" * 32, "b" * 32] and len(store) == 2
        assert_same(await store.get("a" * 32), a)
        await store.put(a.advanced(a.state, [9], 1.0))
        assert (await store.get("a" * 32)).last_token_id == 9
        await store.delete("a" * 32)
        await store.delete("a" * 32)  # absent: no error
        assert await store.get("a" * 32) is None and await store.ids() == ["b" * 32]

    asyncio.run(go())


def test_a_record_remembers_the_last_request_ids_within_a_token_budget():
    record = lstm_record()
    assert record.revision == 1 and record.applied_result("a") is None
    for index in range(5):
        record = record.with_applied(f"id{index}", {"tokens_consumed": index, "token_ids": [7] * 10}, keep=3)
    assert [rid for rid, _ in record.applied] == ["id2", "id3", "id4"]
    assert record.applied_result("id3")["tokens_consumed"] == 3 and record.applied_result("id1") is None
    record = record.with_applied("big", {"token_ids": [1] * 25}, keep=3, token_budget=30)
    assert [rid for rid, _ in record.applied] == ["big"]  # 10 + 10 + 25 tokens held > 30: the oldest went
    assert record.with_applied("", {"x": 1}) is record  # no id, nothing remembered
    back = SessionRecord.from_bytes(record.to_bytes())
    assert back.applied == record.applied and back.revision == record.revision
    assert record.advanced(record.state, [5], 2.0).revision == record.revision + 1
    assert record.touched(3.0).revision == record.revision + 1
