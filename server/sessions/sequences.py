"""Triton sequences (the Open Inference Protocol's `sequence_id`) and the sessions behind them.

The map lives beside the sessions (in the engine process when the server runs several API processes),
so a sequence reaches its session from whichever process its next request arrives at. Its methods are
coroutines because an API process reaches it over IPC; here they answer at once.
"""

from __future__ import annotations

from collections import OrderedDict

SequenceKey = tuple[str, int | str]  # (model name, sequence id)


class SequenceMap:
    """(model, sequence id) -> session id, the `capacity` most recently used (the sessions behind the ones
    dropped end by their own TTL and eviction)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._sessions: OrderedDict[SequenceKey, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    async def get(self, key: SequenceKey) -> str | None:
        session_id = self._sessions.get(key)
        if session_id is not None:
            self._sessions.move_to_end(key)
        return session_id

    async def put(self, key: SequenceKey, session_id: str) -> None:
        self._sessions[key] = session_id
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.capacity:
            self._sessions.popitem(last=False)

    async def pop(self, key: SequenceKey, session_id: str | None = None) -> str | None:
        """Forget `key` (only if it still names `session_id`, when that is given); the session it named."""
        current = self._sessions.get(key)
        if current is None or (session_id is not None and current != session_id):
            return None
        del self._sessions[key]
        return current
