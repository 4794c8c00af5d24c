"""This process's index of open sessions: least recently used order, idle deadlines, and why ended ones went.

The store holds what a session is; the index holds what TTL expiry, LRU eviction and the ordering of
operations need without a store round trip: per open session its model, TTL, times, state size and
its line of operations (`ordering.SessionLine`). Ended ids are remembered (bounded) with why they
ended, so NOT_FOUND can say it. The index keeps the session gauges and eviction counters; it never
touches the store, and decides nothing: the manager asks it what is due and ends those sessions.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator

from server.metrics import Metrics
from server.sessions.ordering import SessionLine
from server.sessions.record import SessionRecord
from server.sessions.store import StoredSession

# sessions_evicted_total{reason} labels (a client's CloseSession is not an eviction).
EXPIRED, EVICTED, MODEL_REMOVED, CLOSED = "expired", "evicted", "model_removed", "closed"


class Live:
    """An open session's index entry."""

    __slots__ = ("model", "version", "ttl_seconds", "created_at", "last_used_at", "state_bytes", "line")

    def __init__(self, record: SessionRecord | StoredSession):
        self.model, self.version, self.ttl_seconds = record.model, record.version, record.ttl_seconds
        self.created_at, self.last_used_at = record.created_at, record.last_used_at
        self.state_bytes = record.state_bytes
        self.line = SessionLine()

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_seconds


class SessionIndex:
    def __init__(self, metrics: Metrics, max_sessions: int, tombstones: int):
        self._metrics = metrics
        self._max_sessions = max_sessions  # for the eviction message
        self._tombstones = tombstones
        self._live: OrderedDict[str, Live] = OrderedDict()  # least recently used first
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, id), at least one entry per session
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone (bounded)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._live

    def get(self, session_id: str) -> Live | None:
        return self._live.get(session_id)

    def why_ended(self, session_id: str) -> str | None:
        """Why a session that ended here (or was found ended in the store) is gone; None if not known."""
        return self._ended.get(session_id)

    def add(self, record: SessionRecord | StoredSession) -> Live:
        live = self._live[record.session_id] = Live(record)
        heapq.heappush(self._expiry, (live.expires_at, record.session_id))
        self._metrics.sessions_active.labels(model=record.model).inc()
        self._metrics.session_state_bytes.labels(model=record.model).inc(live.state_bytes)
        return live

    def touch(self, session_id: str, now: float) -> None:
        """The session was used at `now`: its idle time starts again and it is the most recently used."""
        live = self._live.get(session_id)
        if live is not None:
            live.last_used_at = now
            self._live.move_to_end(session_id)

    def resize(self, session_id: str, state_bytes: int) -> None:
        live = self._live.get(session_id)
        if live is not None and live.state_bytes != state_bytes:
            self._metrics.session_state_bytes.labels(model=live.model).inc(state_bytes - live.state_bytes)
            live.state_bytes = state_bytes

    def forget(self, session_id: str, reason: str | None, why: str | None = None) -> str | None:
        """Drop a session and remember why it ended (`why`, or the reason's message); the message, or None
        if it was not indexed. `reason` (not CLOSED or None) counts as an eviction."""
        live = self._live.pop(session_id, None)
        if live is None:
            return None
        self._unindexed(live)
        if reason not in (CLOSED, None):
            self._metrics.sessions_evicted_total.labels(model=live.model, reason=reason).inc()
        why = why or self.why(reason, live)
        self.remember_end(session_id, why)
        return why

    def remember_end(self, session_id: str, why: str) -> None:
        """Remember why a session this process did not index ended (the store said so)."""
        self._ended[session_id] = why
        self._ended.move_to_end(session_id)
        while len(self._ended) > self._tombstones:
            self._ended.popitem(last=False)

    def count_eviction(self, model: str, reason: str) -> None:
        """An eviction of a session this process did not index (a restart found it expired, a shared
        store's sweep): counted here, as `forget` counts those it indexed."""
        self._metrics.sessions_evicted_total.labels(model=model, reason=reason).inc()

    def least_recently_used_idle(self) -> str | None:
        """The least recently used session with no operation in progress, if any."""
        return next((sid for sid, live in self._live.items() if not live.line.busy), None)

    def due(self, now: float) -> Iterator[str]:
        """The sessions idle past their TTL at `now` with nothing in progress (for the caller to end, as it
        goes: each is yielded while still indexed). A busy session is looked at again a TTL later."""
        for session_id, _ in self._idle_past_ttl(
                now, lambda live: now + live.ttl_seconds if live.line.busy else live.expires_at):
            yield session_id
        if len(self._expiry) > 2 * len(self._live) + 1024:  # entries of ended sessions pile up: rebuild
            self._expiry = [(live.expires_at, sid) for sid, live in self._live.items()]
            heapq.heapify(self._expiry)

    def unindex_idle(self, now: float) -> None:
        """Drop (without ending them) the sessions idle here past their TTL: with a shared store another
        replica may be using them (the store says, when one comes back here) or have ended them."""
        for session_id, live in self._idle_past_ttl(now, lambda live: max(live.expires_at, now + 1.0)):
            del self._live[session_id]
            self._unindexed(live)

    def _idle_past_ttl(self, now: float, look_again_at: Callable[[Live], float]) -> Iterator[tuple[str, Live]]:
        """Pop the deadline heap up to `now`: the idle sessions past their TTL, each yielded once; a busy one
        or one used since its entry was pushed goes back in, at `look_again_at(live)`."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, session_id = heapq.heappop(heap)
            live = self._live.get(session_id)
            if live is None:
                continue
            if live.line.busy or live.expires_at > now:
                heapq.heappush(heap, (look_again_at(live), session_id))
                continue
            yield session_id, live

    def why(self, reason: str, session) -> str:
        """What NOT_FOUND says of a session that ended for `reason` (`session`: its record or index entry)."""
        if reason == CLOSED:
            return "was closed"
        if reason == EXPIRED:
            return f"expired: it was idle for longer than its TTL of {session.ttl_seconds} s"
        if reason == EVICTED:
            return (f"was evicted: the server holds at most {self._max_sessions} sessions and it was the least "
                    "recently used")
        return f"ended: model {session.model} version {session.version} left the repository"

    def _unindexed(self, live: Live) -> None:
        self._metrics.sessions_active.labels(model=live.model).dec()
        self._metrics.session_state_bytes.labels(model=live.model).dec(live.state_bytes)


def short_id(session_id: str) -> str:
    """An id for a message: a client's made-up id may be anything, so it is cut and quoted."""
    return repr(session_id if len(session_id) <= 40 else session_id[:40] + "...")
