"""Opening the session store a `session_store` URL names: each backend imports the store's base, never the
other way round."""

from __future__ import annotations

from server.sessions.redis_store import RedisSessionStore
from server.sessions.sqlite_store import SqliteSessionStore
from server.sessions.store import InMemorySessionStore, SessionStore


def open_store(url: str, *, tombstones: int = 10_000, setting: str = "session_store") -> SessionStore:
    """The store a `session_store` URL names (not yet opened): `memory`, `sqlite:PATH` or
    `redis://HOST:PORT[/DB]`. ValueError naming `setting` for anything else."""
    if url == "memory":
        return InMemorySessionStore(tombstones=tombstones)
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path.startswith("//"):  # sqlite:///abs/path, as SQLAlchemy writes it
            path = path[2:]
        if not path:
            raise ValueError(f"{setting} {url!r} names no file; write sqlite:PATH, e.g. sqlite:state/sessions.db")
        return SqliteSessionStore(path, tombstones=tombstones)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisSessionStore(url, tombstones=tombstones, setting=setting)
    raise ValueError(f"{setting} must be memory, sqlite:PATH or redis://HOST:PORT[/DB], got {url!r}")
