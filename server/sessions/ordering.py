"""One session's operations, applied one at a time in the order the server acknowledged them.

An operation joins its session's line synchronously, when the server accepts it (so the order is the
order of arrival, whatever each operation then awaits), and runs once every operation before it has
finished. A line is a chain of futures: each turn waits for the one before it and resolves its own
when released, also when its caller gave up waiting (the next turn still waits for the previous
one). Reads (GetSession) do not join: they wait for everything acknowledged before them, except that
a unary GetSession reports a generation still running at the end of the line instead of waiting for
it (Converse's get waits for it too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Turn:
    """One operation's place in its session's line: `async with turn:` runs it in order."""

    def __init__(self, line: SessionLine, previous: asyncio.Future | None, done: asyncio.Future, generates: bool,
                 on_release: Callable[[], None]):
        self._line, self._previous, self._done = line, previous, done
        self.generates = generates
        self._on_release = on_release
        self.released = False

    async def __aenter__(self) -> Turn:
        await self.wait()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.release()

    async def wait(self) -> None:
        previous = self._previous
        if previous is None or previous.done():
            return
        try:
            await asyncio.shield(previous)
        except asyncio.CancelledError:
            # Giving up must not let the operations after this one overtake the ones before it.
            previous.add_done_callback(lambda _: self.release())
            raise

    def release(self) -> None:
        """This operation is over (applied, failed or abandoned); idempotent."""
        if self.released:
            return
        self.released = True
        self._done.set_result(None)
        self._line.pending -= 1
        if self.generates:
            self._line.generating = False
        self._on_release()


class SessionLine:
    def __init__(self):
        self.pending = 0  # operations acknowledged and not yet released
        self.generating = False  # a generation is acknowledged and not yet over
        self._tail: asyncio.Future | None = None  # done when the last acknowledged operation is over
        self._tail_generates = False
        self._before_generation: asyncio.Future | None = None  # the tail when that generation joined

    @property
    def busy(self) -> bool:
        return self.pending > 0

    def join(self, *, generates: bool = False, on_release: Callable[[], None] = lambda: None) -> Turn:
        """A turn after every operation acknowledged so far (call it synchronously, on arrival)."""
        done = asyncio.get_running_loop().create_future()
        turn = Turn(self, self._tail, done, generates, on_release)
        if generates:
            self.generating = True
            self._before_generation = self._tail
        self._tail, self._tail_generates = done, generates
        self.pending += 1
        return turn

    async def settled(self, *, generation_included: bool = False) -> None:
        """Wait until what a read should see is applied (see the module docstring); with
        `generation_included`, a generation at the end of the line is waited for too."""
        waited = self._before_generation if self._tail_generates and not generation_included else self._tail
        if waited is not None and not waited.done():
            await asyncio.shield(waited)
