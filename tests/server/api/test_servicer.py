"""server/api/servicer.py's stream helpers: how the API takes a request's events (every ready event at once,
or one by one), and a consumer that leaves cancels the engine request."""

from __future__ import annotations

import asyncio

import pytest
from request_events import finish, stream, token

from server.api.servicer import _one_at_a_time, ready_batches
from server.errors import DeadlineExceeded


def test_ready_batches_coalesce_what_piled_up():
    async def main():
        s, cancelled = stream()
        end = finish()
        batches = ready_batches(s)
        s.put(token(0))
        assert await anext(batches) == [token(0)]
        s.put(token(1))
        s.put(token(2))  # the consumer was away: both go together
        assert await anext(batches) == [token(1), token(2)]
        s.put(token(3))
        s.fail(DeadlineExceeded("late"))
        assert await anext(batches) == [token(3)]  # the events first, then the error
        with pytest.raises(DeadlineExceeded):
            await anext(batches)

        s, _ = stream()
        s.put(token(0))
        s.put(end)
        assert [batch async for batch in ready_batches(s)] == [[token(0), end]]
        assert not s.cancelled  # it finished: nothing to cancel

    asyncio.run(main())


def test_an_interval_holds_a_stream_between_messages_but_never_its_end():
    async def main():
        loop = asyncio.get_running_loop()
        s, _ = stream()
        batches = ready_batches(s, interval=3600.0)
        s.put(token(0))
        assert await anext(batches) == [token(0)]
        later = asyncio.create_task(anext(batches))
        s.put(token(1))
        s.put(token(2))
        for _ in range(10):  # turns of the loop, in which an unheld take would end
            await asyncio.sleep(0)
        assert not later.done()  # held: the tokens wait for the interval
        end = finish()
        started = loop.time()
        s.put(end)  # the end is not held: what piled up goes out with it at once
        assert await asyncio.wait_for(later, 5) == [token(1), token(2), end] and loop.time() - started < 5

        s, _ = stream()
        batches = ready_batches(s, interval=0.05)
        s.put(token(0))
        assert await anext(batches) == [token(0)]
        s.put(token(1))
        assert await asyncio.wait_for(anext(batches), 5) == [token(1)]  # after the interval

    asyncio.run(main())


@pytest.mark.parametrize("batches", [ready_batches, _one_at_a_time])
def test_a_consumer_that_leaves_cancels_the_request(batches):
    async def main():
        s, cancelled = stream()
        s.put(token(0))
        consumer = batches(s)
        assert await anext(consumer) == [token(0)]
        await consumer.aclose()  # the client went away
        assert cancelled == ["cancelled"]

        s, cancelled = stream()
        waiting = asyncio.create_task(anext(batches(s)))
        await asyncio.sleep(0)
        waiting.cancel()  # cancelled while waiting for the engine
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert cancelled == ["cancelled"]

    asyncio.run(main())
