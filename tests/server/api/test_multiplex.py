"""server/api/multiplex.py: the requests of one stream run side by side; every answer owed is sent after the
client half-closes, a request that cannot be read ends the stream with its error, and leaving cancels what
still runs."""

from __future__ import annotations

import asyncio

import pytest

from server.api import multiplex as multiplex_module
from server.api.multiplex import multiplex


def test_answers_put_after_the_client_half_closed_are_all_sent():
    async def main():
        closed = asyncio.Event()

        async def requests():
            yield "r1"
            closed.set()  # the client half-closes as soon as it sent r1

        def start(request):
            async def job(put):
                await closed.wait()  # answers only after the reader saw the end of the requests
                put(f"{request}:a")
                put(f"{request}:b")
            return job

        return [answer async for answer in multiplex(requests(), start, str)]

    assert asyncio.run(main()) == ["r1:a", "r1:b"]


def test_requests_run_side_by_side_and_answers_go_out_as_put():
    async def main():
        second_started = asyncio.Event()

        async def requests():
            for request in ("slow", "fast"):
                yield request

        def start(request):
            async def job(put):
                if request == "slow":
                    await second_started.wait()  # would never end if the requests ran one after another
                else:
                    second_started.set()
                put(request)
            return job

        return [answer async for answer in multiplex(requests(), start, str)]

    assert asyncio.run(main()) == ["fast", "slow"]


def test_a_request_that_cannot_be_read_ends_the_stream_with_its_error():
    async def main():
        async def requests():
            yield "r1"
            raise ValueError("unparsable request")

        def start(request):
            async def job(put):
                await asyncio.Event().wait()  # still running when the stream ends: cancelled with it
            return job

        with pytest.raises(ValueError, match="unparsable"):
            async for _ in multiplex(requests(), start, str):
                pass

    asyncio.run(main())


def test_leaving_cancels_the_requests_still_running():
    async def main():
        cancelled = []

        async def requests():
            yield "quick"
            yield "endless"
            await asyncio.Event().wait()  # the client keeps the stream open

        def start(request):
            async def job(put):
                if request == "quick":
                    put(request)
                    return
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled.append(request)
                    raise
            return job

        stream = multiplex(requests(), start, str)
        assert await anext(stream) == "quick"
        await stream.aclose()  # the client went away
        for _ in range(3):
            await asyncio.sleep(0)  # let the cancellation reach the task
        return cancelled

    assert asyncio.run(main()) == ["endless"]


def test_no_more_than_max_pending_requests_run_at_once(monkeypatch):
    monkeypatch.setattr(multiplex_module, "MAX_PENDING", 2)

    async def main():
        release = asyncio.Event()
        running, most = 0, 0

        async def requests():
            for i in range(5):
                yield i

        def start(request):
            async def job(put):
                nonlocal running, most
                running += 1
                most = max(most, running)
                if running == 2:
                    release.set()
                await release.wait()
                running -= 1
                put(request)
            return job

        answers = [answer async for answer in multiplex(requests(), start, str)]
        return sorted(answers), most

    assert asyncio.run(main()) == ([0, 1, 2, 3, 4], 2)
