"""Stateful sessions: recurrent state parked between calls, fed and continued as rows of the engine's batch.

record.py (what a session is, and its bytes) -> store.py (where records live; compare-and-set on a
revision; the backends sqlite_store.py and redis_store.py, opened by URL in stores.py) -> ordering.py
(one session's operations in order) -> port.py (what sessions use of a model's engine: zero state, feed,
generate, park) -> generation.py (a generation that parks its tokens) -> index.py (open sessions here:
LRU, idle deadlines, why ended ones went) -> transfer.py (export / import bytes) -> policy.py (what differs
between a store of this process's own and one shared by replicas: expiry, the cap, adoption, sweeping)
-> manager.py (create, feed, generate, fork, get, close, export, import; one path over the policy).
sequences.py (Triton sequence ids to session ids) stands beside them.
"""

from server.sessions.generation import SessionGeneration
from server.sessions.manager import FeedResult, SessionInfo, SessionLimits, SessionManager
from server.sessions.port import SessionEngine
from server.sessions.record import SessionFormatError, SessionRecord
from server.sessions.store import InMemorySessionStore, SessionStore, StoreConflict, StoreUnavailable
from server.sessions.stores import open_store

__all__ = [
    "FeedResult", "InMemorySessionStore", "SessionEngine", "SessionFormatError", "SessionGeneration", "SessionInfo",
    "SessionLimits", "SessionManager", "SessionRecord", "SessionStore", "StoreConflict", "StoreUnavailable",
    "open_store",
]
