"""SequenceMap: Triton sequence ids -> sessions, bounded, least recently used dropped first."""

import asyncio

from server.sessions.sequences import SequenceMap


def test_the_least_recently_used_sequence_goes_first_and_pop_checks_the_session():
    async def body():
        sequences = SequenceMap(capacity=2)
        await sequences.put(("lm", 1), "a")
        await sequences.put(("lm", "two"), "b")
        assert await sequences.get(("lm", 1)) == "a"  # now the most recently used
        await sequences.put(("other", 1), "c")
        assert await sequences.get(("lm", "two")) is None and len(sequences) == 2
        assert await sequences.pop(("lm", 1), "not a") is None  # names another session: kept
        assert await sequences.pop(("lm", 1), "a") == "a" and await sequences.get(("lm", 1)) is None
        assert await sequences.pop(("other", 1)) == "c" and len(sequences) == 0

    asyncio.run(body())
