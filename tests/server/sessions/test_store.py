"""The three session stores behind one contract: memory, a real SQLite file, a real redis-server.

Compare-and-set on the revision, ended reasons (bounded), listing for a restart, the LRU and expiry
queries, durability across a reopen, and start-up errors that name the setting.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys

import numpy as np
import pytest

from bench.services import free_port
from server.sessions.record import SessionRecord
from server.sessions.store import InMemorySessionStore, StoreConflict, StoreUnavailable
from server.sessions.stores import open_store


def record(session_id: str, used: float = 100.0, ttl: int = 50) -> SessionRecord:
    state = (np.arange(24, dtype=np.float32).reshape(1, 2, 12), np.ones((1, 2, 12), np.float32))
    return SessionRecord(session_id, "tiny-lm", 1, state, [1, 5, 6], 2, ttl, 90.0, used, checksum="abc")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "memory":
        return "memory"
    if request.param == "sqlite":
        return f"sqlite:{tmp_path}/state/sessions.db"
    server = request.getfixturevalue("redis_server")
    server.flush()
    return server.url


def run(body):
    return asyncio.run(body())


def test_the_store_contract(store_url):
    async def body():
        store = open_store(store_url, tombstones=3)
        await store.open()
        try:
            a, b = record("a" * 32, used=100.0), record("b" * 32, used=10.0)
            await store.put(a)
            await store.put(b)
            with pytest.raises(StoreConflict):
                await store.put(a)  # revision 1 again: a second create of one id
            later = a.advanced(a.state, [7], 120.0)
            await store.put(later)
            with pytest.raises(StoreConflict):
                await store.put(a.advanced(a.state, [8], 121.0))  # written over revision 1, which is gone
            got = await store.get("a" * 32)
            assert got.revision == 2 and got.history.tolist() == [1, 5, 6, 7] and got.checksum == "abc"
            assert np.array_equal(got.state[0], a.state[0])
            assert await store.count() == 2
            assert sorted(s.session_id for s in await store.sessions()) == ["a" * 32, "b" * 32]
            assert await store.least_recently_used(1) == ["b" * 32]
            assert await store.due(60.0 + 1) == ["b" * 32]  # b: used at 10, TTL 50
            assert not await store.expire("a" * 32, "expired: idle", 150.0)  # a was used at 120
            assert await store.expire("b" * 32, "expired: idle", 61.0)
            assert await store.ended("b" * 32) == "expired: idle"
            await store.delete("a" * 32, "was closed")
            await store.delete("a" * 32, "was closed")  # absent: no error
            assert await store.get("a" * 32) is None and await store.ended("a" * 32) == "was closed"
            assert await store.count() == 0
            for index in range(4):  # tombstones are bounded: the oldest reason is forgotten
                await store.put(record(f"{index:032d}"))
                await store.delete(f"{index:032d}", f"reason {index}")
            assert await store.ended("b" * 32) is None and await store.ended(f"{3:032d}") == "reason 3"
        finally:
            await store.close()

    run(body)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_reopened_store_has_what_was_acknowledged(kind, tmp_path, request):
    url = f"sqlite:{tmp_path}/s.db" if kind == "sqlite" else request.getfixturevalue("redis_server").url

    async def write():
        store = open_store(url)
        await store.open()
        await asyncio.gather(*(store.put(record(f"{i:032d}")) for i in range(50)))  # one group commit or a few
        await store.delete(f"{0:032d}", "was closed")
        await store.close()

    async def read():
        store = open_store(url)
        await store.open()
        try:
            assert await store.count() == 49 and await store.ended(f"{0:032d}") == "was closed"
            assert (await store.get(f"{7:032d}")).history.tolist() == [1, 5, 6]
        finally:
            await store.close()

    if kind == "redis":
        request.getfixturevalue("redis_server").flush()
    run(write)
    run(read)


def test_the_sqlite_file_is_in_wal_mode_and_fully_synchronous(tmp_path):
    import sqlite3

    async def body():
        store = open_store(f"sqlite:{tmp_path}/s.db")
        await store.open()
        await store.put(record("a" * 32))
        await store.close()

    run(body)
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_sqlite_path_is_a_start_up_error_naming_the_setting(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)

    async def body():
        store = open_store(f"sqlite:{locked}/sub/s.db")
        with pytest.raises(StoreUnavailable, match="session_store sqlite:.*cannot open or create"):
            await store.open()

    run(body)


def test_a_sqlite_path_that_is_a_directory_is_a_start_up_error(tmp_path):
    async def body():
        store = open_store(f"sqlite:{tmp_path}")
        with pytest.raises(StoreUnavailable, match="session_store sqlite:"):
            await store.open()

    run(body)


def test_an_unreachable_redis_is_a_start_up_error_naming_the_setting():
    port = free_port()  # a port nothing listens on

    async def body():
        store = open_store(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(StoreUnavailable, match=f"session_store redis://127.0.0.1:{port}/0: Redis does not answer"):
            await store.open()
        await store.close()

    run(body)


def test_bad_urls_are_refused_naming_the_setting():
    for url in ("sqlite:", "postgres://x", "mem"):
        with pytest.raises(ValueError, match="session_store"):
            open_store(url)
    assert isinstance(open_store("memory"), InMemorySessionStore)


def test_serve_refuses_a_bad_or_unreachable_store_at_start_up_naming_the_setting(lm_repository, capsys):
    import logging

    from server.cli import EXIT_CONFIG, EXIT_STARTUP, serve_main

    common = ["--repository", str(lm_repository), "--port", "0", "--metrics-port", "-1", "--log-format", "text"]
    assert serve_main([*common, "--session-store", "postgres://db/x"]) == EXIT_CONFIG
    assert "session_store must be memory, sqlite:PATH or redis://HOST:PORT[/DB], got 'postgres://db/x'" in \
        capsys.readouterr().err
    port = free_port()  # a port nothing listens on
    try:
        assert serve_main([*common, "--session-store", f"redis://127.0.0.1:{port}/0"]) == EXIT_STARTUP
    finally:
        logging.getLogger().handlers.clear()
    assert f"session_store redis://127.0.0.1:{port}/0: Redis does not answer" in capsys.readouterr().err
