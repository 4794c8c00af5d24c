"""server/sessions/ordering.py: one session's operations run one at a time, in the order acknowledged."""

from __future__ import annotations

import asyncio

import pytest

from server.sessions.ordering import SessionLine


def test_operations_run_in_the_order_they_joined_whatever_they_await():
    async def go():
        line, log = SessionLine(), []

        async def operation(name: str, delay: float):
            async with turn_of[name]:
                log.append(f"{name} starts")
                await asyncio.sleep(delay)
                log.append(f"{name} ends")

        turn_of = {name: line.join() for name in "abc"}  # acknowledged a, b, c
        assert line.pending == 3 and line.busy
        await asyncio.gather(operation("c", 0), operation("b", 0.01), operation("a", 0.03))
        assert log == ["a starts", "a ends", "b starts", "b ends", "c starts", "c ends"]
        assert line.pending == 0 and not line.busy

    asyncio.run(go())


def test_a_caller_that_gives_up_waiting_does_not_let_later_ones_overtake():
    async def go():
        line, log = SessionLine(), []
        first, second, third = line.join(), line.join(), line.join()
        await first.__aenter__()
        waiting = asyncio.create_task(second.__aenter__())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

        async def last():
            async with third:
                log.append("third")

        task = asyncio.create_task(last())
        await asyncio.sleep(0.01)
        assert log == []  # the first operation still runs
        await first.__aexit__(None, None, None)
        await task
        assert log == ["third"] and second.released and line.pending == 0

    asyncio.run(go())


def test_reads_wait_for_earlier_operations_but_not_for_a_running_generation():
    async def go():
        line = SessionLine()
        feed = line.join()
        generation = line.join(generates=True)
        assert line.generating

        read = asyncio.create_task(line.settled())
        await asyncio.sleep(0.01)
        assert not read.done()  # the feed before it is not applied yet
        async with feed:
            pass
        await asyncio.wait_for(read, 1)  # the generation at the end of the line is not waited for

        strict = asyncio.create_task(line.settled(generation_included=True))
        await asyncio.sleep(0.01)
        assert not strict.done()
        async with generation:
            pass
        await asyncio.wait_for(strict, 1)
        assert not line.generating and line.pending == 0

        # An operation after the generation makes every read wait for both.
        generation, after = line.join(generates=True), line.join()
        read = asyncio.create_task(line.settled())
        async with generation:
            await asyncio.sleep(0.01)
            assert not read.done()
        async with after:
            pass
        await asyncio.wait_for(read, 1)

    asyncio.run(go())
