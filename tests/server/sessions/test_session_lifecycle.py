"""How sessions end, against a real server with a small session cap and a 1 s default TTL: LRU eviction,
idle expiry (when touched, and by the sweeper), busy sessions kept, reasons in NOT_FOUND, the metrics.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seqserve.v1 import service_pb2 as pb
from server.app import ServerThread
from server.config import ServerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LSTM_STATE_BYTES = 192


@pytest.fixture(scope="module")
def server(lm_repository):
    config = ServerConfig(repository=str(lm_repository), port=0, metrics_port=0, poll_interval_seconds=0,
                          max_sessions=3, session_ttl_seconds=1, max_session_ttl_seconds=60, max_new_tokens=1_000_000,
                          log_level="warning")
    with ServerThread(config) as running:
        yield running


def metric(server, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"model": "tiny-lm", **labels}:
                return sample.value
    return 0.0


def create(stub, ttl_seconds: int = 0) -> str:
    request = pb.CreateSessionRequest(model="tiny-lm", prefix="the", ttl_seconds=ttl_seconds)
    return stub.CreateSession(request).session_id


def not_found(stub, session_id: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetSession(pb.GetSessionRequest(session_id=session_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    return caught.value.details()


def close_all(stub, *session_ids: str) -> None:
    for session_id in session_ids:
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


def test_the_least_recently_used_idle_session_is_evicted_at_the_cap(server, stub):
    evicted = metric(server, "seqserve_sessions_evicted_total", reason="evicted")
    a, b, c = (create(stub, 60) for _ in range(3))
    assert metric(server, "seqserve_sessions_active") == 3
    assert metric(server, "seqserve_session_state_bytes") == 3 * LSTM_STATE_BYTES
    stub.Feed(pb.FeedRequest(session_id=a, text=" cat"))  # a is used again: b is now the least recently used
    d = create(stub, 60)
    assert "was evicted" in not_found(stub, b) and "least recently used" in not_found(stub, b)
    assert metric(server, "seqserve_sessions_evicted_total", reason="evicted") == evicted + 1
    assert metric(server, "seqserve_sessions_active") == 3

    # Sessions in the middle of an operation are never evicted: with all of them busy, creating one fails.
    # Endless generations: the cancellations below end them.
    calls = [stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=s, options=pb.DecodingOptions(max_new_tokens=1_000_000, min_new_tokens=1_000_000)))
        for s in (a, c, d)]
    for call in calls:
        next(call)
    with pytest.raises(grpc.RpcError) as caught:
        create(stub, 60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "every one is busy" in caught.value.details()
    for call in calls:
        call.cancel()
    deadline = time.monotonic() + 10
    while any(stub.GetSession(pb.GetSessionRequest(session_id=s)).generating for s in (a, c, d)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    e = create(stub, 60)
    alive = _alive(stub, a, c, d)  # one of them made room
    assert len(alive) == 2 and metric(server, "seqserve_sessions_evicted_total", reason="evicted") == evicted + 2

    close_all(stub, *alive)
    assert "was closed" in not_found(stub, alive[0])
    assert metric(server, "seqserve_sessions_evicted_total", reason="evicted") == evicted + 2  # closing is no eviction
    close_all(stub, e)
    assert metric(server, "seqserve_sessions_active") == 0 and metric(server, "seqserve_session_state_bytes") == 0


def _alive(stub, *session_ids: str) -> list[str]:
    alive = []
    for session_id in session_ids:
        try:
            stub.GetSession(pb.GetSessionRequest(session_id=session_id))
            alive.append(session_id)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND and "was evicted" in error.details()
    return alive


def test_idle_sessions_expire_after_their_ttl(server, stub):
    expired = metric(server, "seqserve_sessions_evicted_total", reason="expired")
    touched, swept, kept = create(stub), create(stub), create(stub, 60)  # the default TTL here is 1 s
    assert stub.GetSession(pb.GetSessionRequest(session_id=touched)).ttl_seconds == 1
    time.sleep(1.1)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Feed(pb.FeedRequest(session_id=touched, text="x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired: it was idle for longer than its TTL of 1 s" in caught.value.details()
    # Nobody touches `swept`: the sweeper (every second) ends it.
    deadline = time.monotonic() + 5
    while metric(server, "seqserve_sessions_evicted_total", reason="expired") < expired + 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "expired" in not_found(stub, swept)
    assert metric(server, "seqserve_sessions_active") == 1

    # Use keeps a session alive: four feeds 1 s apart outlive its 3 s TTL (2 s of slack for a busy machine
    # between feeds; without the refresh it would expire by the third).
    close_all(stub, kept)
    alive = create(stub, 3)
    for _ in range(4):
        time.sleep(1.0)
        stub.Feed(pb.FeedRequest(session_id=alive, text=" a"))
    assert stub.GetSession(pb.GetSessionRequest(session_id=alive)).tokens_consumed == 3 + 4 * 2
    close_all(stub, alive)
