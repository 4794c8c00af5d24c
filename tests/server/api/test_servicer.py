"""server/api/servicer.py's stream helpers: how the API takes a request's events (every ready event at once,
or one by one), and a consumer that leaves cancels the engine request."""

from __future__ import annotations

import asyncio

import pytest
from request_events import finish, stream, token

from server.api.servicer import _one_at_a_time, _ready_batches
from server.errors import DeadlineExceeded


def test_ready_batches_coalesce_what_piled_up():
    async def main():
        s, cancelled = stream()
        end = finish()
        batches = _ready_batches(s)
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
        assert [batch async for batch in _ready_batches(s)] == [[token(0), end]]
        assert not s.cancelled  # it finished: nothing to cancel

    asyncio.run(main())


@pytest.mark.parametrize("batches", [_ready_batches, _one_at_a_time])
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
