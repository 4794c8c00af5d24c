"""How the API takes a request's events: every ready event at once, errors after the events before them,
and a consumer that leaves cancels the engine request (RequestStream.next_batch, servicer._ready_batches)."""

from __future__ import annotations

import asyncio

import pytest

from server.api.servicer import _one_at_a_time, _ready_batches
from server.decoding import DecodingParams, FinishReason
from server.engine.requests import FinishEvent, RequestStream, TokenEvent
from server.errors import DeadlineExceeded


def token(i: int) -> TokenEvent:
    return TokenEvent(token_ids=[i], log_probs=None, top_alternatives=None, text=f"t{i}")


def finish() -> FinishEvent:
    return FinishEvent(reason=FinishReason.LENGTH, hypotheses=[], text="", generated_ids=[], final_state=None,
                       prompt_tokens=1)


def stream() -> tuple[RequestStream, list[str]]:
    cancelled = []
    return RequestStream("r", DecodingParams(), on_cancel=lambda: cancelled.append("cancelled")), cancelled


def test_next_batch_takes_every_ready_event_then_ends():
    async def main():
        s, cancelled = stream()
        waiting = asyncio.create_task(s.next_batch())
        await asyncio.sleep(0)
        s.put(token(0))
        assert await waiting == [token(0)]
        for i in (1, 2, 3):
            s.put(token(i))
        assert await s.next_batch() == [token(1), token(2), token(3)]
        end = finish()
        s.put(end)
        s.put(token(9))  # nothing after the finish event
        assert await s.next_batch() == [end]
        assert await s.next_batch() == [] and await s.next_batch() == []
        assert cancelled == []

    asyncio.run(main())


def test_an_error_comes_after_the_events_before_it():
    async def main():
        s, _ = stream()
        s.put(token(0))
        s.put(token(1))
        s.fail(DeadlineExceeded("late"))
        s.put(token(2))  # ignored: the stream ended
        assert await s.next_batch() == [token(0), token(1)]
        with pytest.raises(DeadlineExceeded):
            await s.next_batch()
        assert await s.next_batch() == []

    asyncio.run(main())


def test_iterating_gives_events_one_by_one_then_the_error():
    async def main():
        s, _ = stream()
        s.put(token(0))
        s.fail(DeadlineExceeded("late"))
        received = []
        with pytest.raises(DeadlineExceeded):
            async for event in s:
                received.append(event)
        assert received == [token(0)]
        assert [event async for event in s] == []

        s, _ = stream()
        end = finish()
        for event in (token(0), token(1), end):
            s.put(event)
        assert [event async for event in s] == [token(0), token(1), end]

    asyncio.run(main())


@pytest.mark.parametrize("take", ["next_batch", "iterate"])
def test_a_cancelled_wait_cancels_the_request(take):
    async def main():
        s, cancelled = stream()
        waiting = asyncio.create_task(s.next_batch() if take == "next_batch" else s.__anext__())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert s.cancelled and cancelled == ["cancelled"]

    asyncio.run(main())


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


def test_a_stream_has_one_consumer_at_a_time():
    async def main():
        s, _ = stream()
        first = asyncio.create_task(s.next_batch())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="second consumer"):
            await s.next_batch()
        s.put(token(0))
        assert await first == [token(0)]

    asyncio.run(main())
