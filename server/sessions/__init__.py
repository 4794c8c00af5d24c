"""Stateful sessions: recurrent state parked between calls, fed and continued as rows of the engine's batch.

record.py (what a session is, and its bytes) -> store.py (where records live) -> ordering.py (one
session's operations in order) -> generation.py (a generation that parks its tokens) -> manager.py
(create, feed, generate, fork, get, close; TTL, LRU eviction, metrics).
"""

from server.sessions.generation import SessionGeneration
from server.sessions.manager import FeedResult, SessionInfo, SessionLimits, SessionManager
from server.sessions.record import SessionFormatError, SessionRecord
from server.sessions.store import InMemorySessionStore, SessionStore

__all__ = [
    "FeedResult", "InMemorySessionStore", "SessionFormatError", "SessionGeneration", "SessionInfo", "SessionLimits",
    "SessionManager", "SessionRecord", "SessionStore",
]
