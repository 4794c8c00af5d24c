"""Two `seqserve serve` processes on one real redis-server are replicas: either serves any session, and
operations on one session are serialised across them (compare-and-set on the record's revision).

Races: both replicas hammer Feed on one session from several threads; the session's final
tokens_consumed is the sum of the acknowledged feeds, and a feed retried with its request_id (also
after an ABORTED) is applied once."""

from __future__ import annotations

import random
import threading
import uuid

import grpc
import pytest

from bench.services import ServeProcess
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THREADS_PER_REPLICA, FEEDS_PER_THREAD = 3, 15


@pytest.fixture(scope="module")
def replicas(lm_repository, redis_server):
    redis_server.flush()
    started = []
    try:
        for _ in range(2):
            started.append(ServeProcess(lm_repository, session_store=redis_server.url))
        yield started
    finally:
        for replica in started:
            replica.stop()


def stubs(replicas):
    channels = [grpc.insecure_channel(replica.target) for replica in replicas]
    return channels, [pb_grpc.SeqserveStub(channel) for channel in channels]


def test_either_replica_serves_any_session(replicas):
    channels, (a, b) = stubs(replicas)
    try:
        session = a.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the"))
        assert b.Feed(pb.FeedRequest(session_id=session.session_id, text=" cat")).tokens_consumed == 7
        assert a.GetSession(pb.GetSessionRequest(session_id=session.session_id)).tokens_consumed == 7
        options = pb.DecodingOptions(max_new_tokens=10, min_new_tokens=10)
        on_a = list(a.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=session.session_id, options=options, leave_session_unchanged=True)))
        on_b = list(b.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=session.session_id, options=options, leave_session_unchanged=True)))
        assert on_a[-1].done.text == on_b[-1].done.text
        b.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        with pytest.raises(grpc.RpcError) as caught:
            a.Feed(pb.FeedRequest(session_id=session.session_id, text="x"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "was closed" in caught.value.details()
    finally:
        for channel in channels:
            channel.close()


def test_two_replicas_hammering_one_session_lose_no_feed_and_apply_retries_once(replicas):
    channels, replica_stubs = stubs(replicas)
    try:
        session_id = replica_stubs[0].CreateSession(pb.CreateSessionRequest(model="tiny-lm")).session_id
        fed = []  # tokens of every acknowledged feed (a char tokenizer: one token a character)
        aborted = []
        lock = threading.Lock()
        failures = []

        def feed(stub, text: str, request_id: str) -> pb.FeedResponse:
            while True:  # what a client does with ABORTED: send the same request again
                try:
                    return stub.Feed(pb.FeedRequest(session_id=session_id, text=text, request_id=request_id),
                                     timeout=60)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.ABORTED:
                        raise
                    assert "retry" in error.details()
                    with lock:
                        aborted.append(request_id)

        def hammer(stub, seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(FEEDS_PER_THREAD):
                    text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 4)))
                    request_id = uuid.uuid4().hex
                    first = feed(stub, text, request_id)
                    with lock:
                        fed.append(len(text))
                    if rng.random() < 0.3:  # a retry (on either replica) returns the first answer
                        again = feed(rng.choice(replica_stubs), text, request_id)
                        assert (again.tokens_fed, again.tokens_consumed) == (first.tokens_fed, first.tokens_consumed)
            except BaseException as error:  # noqa: BLE001 - reported by the main thread
                failures.append(error)

        threads = [threading.Thread(target=hammer, args=(stub, 100 * r + t))
                   for r, stub in enumerate(replica_stubs) for t in range(THREADS_PER_REPLICA)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert not failures, failures[0]
        assert len(fed) == 2 * THREADS_PER_REPLICA * FEEDS_PER_THREAD
        for stub in replica_stubs:
            assert stub.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_consumed == sum(fed)
    finally:
        for channel in channels:
            channel.close()


def test_a_generation_retried_with_its_request_id_is_applied_once(replicas):
    channels, (a, b) = stubs(replicas)
    try:
        session_id = a.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the dog")).session_id
        request = pb.GenerateInSessionRequest(session_id=session_id, request_id="turn-1",
                                              options=pb.DecodingOptions(max_new_tokens=8, min_new_tokens=8))
        first = list(a.GenerateInSession(request))
        again = list(b.GenerateInSession(request))  # the client's retry, landing on the other replica
        tokens = [[t for r in answer[:-1] for t in r.chunk.token_ids] for answer in (first, again)]
        assert tokens[0] == tokens[1] and len(tokens[0]) == 8
        assert first[-1].done.text == again[-1].done.text
        assert first[-1].done.session_tokens_consumed == again[-1].done.session_tokens_consumed == 7 + 8
        assert b.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_consumed == 7 + 8
        request.request_id = "turn-2"  # a new id generates anew
        assert list(a.GenerateInSession(request))[-1].done.session_tokens_consumed == 7 + 16
    finally:
        for channel in channels:
            channel.close()


def test_converse_on_one_replica_continues_a_session_of_the_other(replicas):
    channels, (a, b) = stubs(replicas)
    try:
        session_id = a.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="a cat")).session_id
        requests = [pb.ConverseRequest(request_tag="f", feed=pb.FeedRequest(session_id=session_id, text=" ran")),
                    pb.ConverseRequest(request_tag="g", generate=pb.GenerateInSessionRequest(
                        session_id=session_id, options=pb.DecodingOptions(max_new_tokens=5, min_new_tokens=5))),
                    pb.ConverseRequest(request_tag="s", get=pb.GetSessionRequest(session_id=session_id))]
        answers = list(b.Converse(iter(requests)))
        assert not [r for r in answers if r.HasField("error")], answers
        assert [r.feed.tokens_consumed for r in answers if r.request_tag == "f"] == [9]
        assert [r.get.tokens_consumed for r in answers if r.request_tag == "s"] == [9 + 5]
        assert a.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_consumed == 9 + 5
    finally:
        for channel in channels:
            channel.close()
