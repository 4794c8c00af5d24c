"""server/engine/requests.py: a request's stream of events. Every ready event at once, errors after the
events before them, one consumer, a consumer that leaves cancels the request, and the hooks a session
generation (a RequestStream its task fills) uses: `close` and `on_end_taken`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from request_events import finish, stream, token

from server.decoding import DecodingParams
from server.engine.requests import FinishEvent, RequestStream, StepOutput, StreamTable, TokenEvent
from server.errors import DeadlineExceeded
from server.text.table import TokenTable


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


@pytest.mark.parametrize("take", ["next_batch", "iterate"])
def test_closing_ends_the_stream_without_a_finish_and_wakes_the_consumer(take):
    async def main():
        s, cancelled = stream()
        s.put(token(0))
        s.close()
        s.put(token(1))  # ignored: the stream ended
        if take == "next_batch":
            assert await s.next_batch() == [token(0)]
            assert await s.next_batch() == []
        else:
            assert [event async for event in s] == [token(0)]

        s, _ = stream()
        waiting = asyncio.create_task(s.next_batch() if take == "next_batch" else s.__anext__())
        await asyncio.sleep(0)
        s.close()  # the producer stopped while the consumer waited
        if take == "next_batch":
            assert await waiting == []
        else:
            with pytest.raises(StopAsyncIteration):
                await waiting
        assert cancelled == []

    asyncio.run(main())


@pytest.mark.parametrize("take", ["next_batch", "iterate"])
@pytest.mark.parametrize("ending", ["finish", "error", "close"])
def test_on_end_taken_runs_once_when_the_consumer_took_the_end(take, ending):
    async def main():
        taken = []
        s = RequestStream("r", DecodingParams(), on_end_taken=lambda: taken.append(True))
        s.put(token(0))
        assert await s.next_batch() == [token(0)] and taken == []  # not ended yet
        s.put(token(1))
        {"finish": lambda: s.put(finish()), "error": lambda: s.fail(DeadlineExceeded("late")),
         "close": s.close}[ending]()
        assert taken == []  # ended, but the consumer has not taken the end yet
        received = []
        try:
            if take == "next_batch":
                while batch := await s.next_batch():
                    received += batch
                    if ending == "finish":
                        assert taken == [True]  # with the batch that holds the finish event
            else:
                async for event in s:
                    received.append(event)
                    if isinstance(event, FinishEvent):
                        assert taken == [True]  # when the finish event is handed over
        except DeadlineExceeded:
            assert ending == "error"
        assert received[0] == token(1)
        assert taken == [True]
        assert await s.next_batch() == [] and taken == [True]

    asyncio.run(main())


# --- plain rows' tokens: arrays in, text when taken ---------------------------------------------------------

def word_table():
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "the": 4, "cat": 5, "sat": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    return TokenTable.build(tokenizer)


def test_plain_tokens_that_piled_up_are_one_event_with_their_text():
    async def main():
        s = RequestStream("r", DecodingParams(), table=word_table(), context_ids=[1, 4])  # after "<bos> the"
        waiting = asyncio.create_task(s.next_batch())
        await asyncio.sleep(0)
        s.put_token(5)  # wakes the consumer
        assert await waiting == [TokenEvent([5], None, None, " cat")]
        s.put_token(6)
        s.put_token(4)
        end = finish()
        s.put(end)
        s.put_token(5)  # after the end: dropped
        assert await s.next_batch() == [TokenEvent([6, 4], None, None, " sat the"), end]
        assert await s.next_batch() == []

    asyncio.run(main())


def test_a_stream_ends_after_the_plain_tokens_before_its_error_or_finish():
    async def main():
        s = RequestStream("r", DecodingParams(), table=word_table())
        s.put_token(4)
        s.fail(DeadlineExceeded("late"))
        events = []
        with pytest.raises(DeadlineExceeded):
            async for event in s:
                events.append(event)
        assert events == [TokenEvent([4], None, None, "the")]

    asyncio.run(main())


def test_stream_table_routes_a_steps_arrays_and_events_and_forgets_ended_streams():
    async def main():
        table, words = StreamTable(), word_table()
        streams = {key: RequestStream(f"r{key}", DecodingParams(), table=words) for key in (7, 8)}
        for key, s in streams.items():
            table.add(key, s)
        end = finish()
        table.deliver(StepOutput(np.array([7, 8, 7]), np.array([4, 5, 6]), [(8, end), (99, end)]))
        assert len(table) == 1  # 8 ended; 99 is no stream of this table
        assert await streams[7].next_batch() == [TokenEvent([4, 6], None, None, "the sat")]
        assert await streams[8].next_batch() == [TokenEvent([5], None, None, "cat"), end]
        table.fail_all(DeadlineExceeded("gone"))
        with pytest.raises(DeadlineExceeded):
            await streams[7].next_batch()

    asyncio.run(main())


def test_hold_waits_for_its_time_or_the_end_and_tokens_wake_nobody():
    async def main():
        loop = asyncio.get_running_loop()
        s = RequestStream("r", DecodingParams(), table=word_table())
        holding = asyncio.create_task(s.hold(loop.time() + 60))
        await asyncio.sleep(0)
        s.put_token(4)
        for _ in range(10):  # turns of the loop, in which a woken hold would end
            await asyncio.sleep(0)
        assert not holding.done()  # a token is no reason to stop holding
        s.put(finish())  # the end is: its events are never held back
        await asyncio.wait_for(holding, 5)
        await s.hold(loop.time() + 60)  # an ended stream holds nothing
        await asyncio.wait_for(RequestStream("q", DecodingParams()).hold(loop.time() + 0.01), 5)

    asyncio.run(main())
