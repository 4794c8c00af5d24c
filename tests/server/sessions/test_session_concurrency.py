"""Sessions under concurrency, against a real server on a tiny LSTM bundle: one generation at a time per
session, operations applied in order, cancellation leaving the session consistent, and 100 sessions
advancing together as rows of one batch, each as its own text would.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import pytest

from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S = pb.DecodingOptions
WORDS = "the a cat dog sat ran on under mat log big small red blue".split()
ENDLESS_TOKENS = 1_000_000  # no machine reaches it before the test ends the generation
ENDLESS = S(max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)


@pytest.fixture(scope="module")
def server(lm_repository):
    config = ServerConfig(repository=str(lm_repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          max_new_tokens=ENDLESS_TOKENS, log_level="warning")
    with ServerThread(config) as running:
        yield running


def create(stub, prefix: str) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix=prefix)).session_id


def tokens_consumed(stub, session_id: str) -> int:
    return stub.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_consumed


def generate_ids(stub, prompt: str, count: int) -> list[int]:
    responses = stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt=prompt,
                                                 options=S(max_new_tokens=count, min_new_tokens=count)))
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def continue_ids(stub, session_id: str, count: int) -> list[int]:
    responses = stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session_id, options=S(max_new_tokens=count, min_new_tokens=count)))
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def test_a_second_generation_is_refused_and_other_operations_wait_their_turn(stub):
    session_id = create(stub, "the")
    running = stub.GenerateInSession(pb.GenerateInSessionRequest(session_id=session_id, options=ENDLESS))
    streamed = list(next(running).chunk.token_ids)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateInSession(pb.GenerateInSessionRequest(session_id=session_id)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already generating" in caught.value.details()
    snapshot = stub.GetSession(pb.GetSessionRequest(session_id=session_id))  # answers during the generation
    assert snapshot.generating and snapshot.tokens_consumed == 3

    # A Feed sent now is acknowledged now and applied after the generation: never interleaved with it.
    fed = {}
    feeder = threading.Thread(target=lambda: fed.update(
        response=stub.Feed(pb.FeedRequest(session_id=session_id, text=" cat"))))
    feeder.start()
    time.sleep(0.2)
    assert "response" not in fed
    for response in running:
        streamed += response.chunk.token_ids
        if len(streamed) >= 30:
            running.cancel()
            break
    feeder.join(timeout=30)
    generated = fed["response"].tokens_consumed - 3 - 4
    assert generated >= len(streamed)  # what the server generated before it saw the cancellation
    assert not stub.GetSession(pb.GetSessionRequest(session_id=session_id)).generating
    # The session's text is "the", the generated tokens, then " cat": it continues as that text does.
    assert streamed == generate_ids(stub, "the", generated)[: len(streamed)]
    assert continue_ids(stub, session_id, 10) == continue_ids(stub, _session_with(stub, "the", generated, " cat"), 10)


def _session_with(stub, prefix: str, generated: int, fed: str) -> str:
    """A session whose text is `prefix`, then its first `generated` greedy tokens (no <eos>), then `fed`."""
    session_id = create(stub, prefix)
    continue_ids(stub, session_id, generated)
    stub.Feed(pb.FeedRequest(session_id=session_id, text=fed))
    return session_id


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_an_interrupted_generation_leaves_the_tokens_generated_so_far(stub, how):
    session_id = create(stub, "a big")
    call = stub.GenerateInSession(pb.GenerateInSessionRequest(session_id=session_id, options=ENDLESS),
                                  timeout=1.0 if how == "deadline" else None)
    streamed = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in call:
            streamed += response.chunk.token_ids
            if how == "cancel" and len(streamed) >= 20:
                call.cancel()
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.code() == expected and streamed

    deadline = time.monotonic() + 10  # the engine drops the row at its next step, then the session parks
    while stub.GetSession(pb.GetSessionRequest(session_id=session_id)).generating and time.monotonic() < deadline:
        time.sleep(0.01)
    generated = tokens_consumed(stub, session_id) - len("a big")
    assert generated >= len(streamed) > 0
    # Whole tokens only, state and history together: the session continues exactly as the text
    # "a big" + its `generated` greedy tokens does.
    whole = generate_ids(stub, "a big", generated + 15)
    assert streamed == whole[: len(streamed)]
    assert continue_ids(stub, session_id, 15) == whole[generated:]


def test_100_sessions_advance_concurrently_with_independent_outputs(server):
    open_before = len(server.app.sessions)
    metrics = server.app.metrics.registry

    def wide_steps() -> float:
        """Decode steps that advanced more than 2 rows at once."""
        labels = {"model": "tiny-lm"}
        return (metrics.get_sample_value("seqserve_batch_size_count", labels)
                - metrics.get_sample_value("seqserve_batch_size_bucket", {**labels, "le": "2.0"}))

    wide_before = wide_steps()
    rng = random.Random(5)
    cases = []
    for i in range(100):
        prefix = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        fed = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        options = S(max_new_tokens=40, min_new_tokens=rng.choice([0, 40]))
        if i % 3 == 1:
            options = S(strategy=S.STRATEGY_SAMPLE, seed=i, temperature=1.2, max_new_tokens=40)
        cases.append((prefix, fed, options))

    async def open_and_feed(stub, prefix, fed):
        session = await stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix=prefix))
        await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=fed))
        return session.session_id

    async def session_run(stub, session_id, options):
        ids = [t async for r in stub.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=session_id, options=options)) if r.HasField("chunk") for t in r.chunk.token_ids]
        info = await stub.GetSession(pb.GetSessionRequest(session_id=session_id))
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
        return ids, info.tokens_consumed

    async def plain_run(stub, prefix, fed, options):
        request = pb.GenerateRequest(model="tiny-lm", prompt=prefix + fed, options=options)
        return [t async for r in stub.Generate(request) if r.HasField("chunk") for t in r.chunk.token_ids]

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SeqserveStub(channel)
            opened = await asyncio.gather(*(open_and_feed(stub, prefix, fed) for prefix, fed, _ in cases))
            sessions = asyncio.gather(*(session_run(stub, session_id, options)
                                        for session_id, (_, _, options) in zip(opened, cases, strict=True)))
            plain = asyncio.gather(*(plain_run(stub, *case) for case in cases))
            return await sessions, await plain

    sessions, plain = asyncio.run(main())
    for (ids, consumed), expected, (prefix, fed, _) in zip(sessions, plain, cases, strict=True):
        assert ids == expected
        assert consumed in (len(prefix + fed) + len(ids), len(prefix + fed) + len(ids) + 1)  # + <eos>
    assert len({tuple(ids) for ids, _ in sessions}) > 20  # the texts differ, and so do their outputs
    assert len(server.app.sessions) == open_before  # every one closed
    assert wide_steps() > wide_before  # rows of one batch, not one after another
