"""A session stays on the model version it started on when a new version is published and hot-swapped in
(a real server on 127.0.0.1 port 0; v1 is a tiny LSTM LM, v2 a tiny GRU LM, so their states differ)."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))
S = pb.DecodingOptions
LONG = 50_000  # tokens of a generation that is still running when the new version arrives
LSTM_STATE_BYTES, GRU_STATE_BYTES = 192, 96  # (h, c) vs (h,), each [1, 2 layers, 12 hidden] float32


@pytest.fixture(scope="module")
def served(lm_repository, tiny_runs, tmp_path_factory):
    repository = lm_repository
    staging = tmp_path_factory.mktemp("session-hot-swap-staging")
    v2 = export_run(tiny_runs["gru", "lm"], staging, "tiny-lm", version=2, options=SMALL_EXPORT).path
    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          max_new_tokens=LONG, log_level="warning")
    with ServerThread(config) as server:
        yield server, repository, v2


def ids_of(responses) -> list[int]:
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def test_a_session_survives_a_hot_swap_on_its_own_version(served):
    server, repository, v2 = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SeqserveStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the c"))
        stub.Feed(pb.FeedRequest(session_id=session.session_id, text="at"))
        busy = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="a big")).session_id
        in_flight = stub.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=busy, options=S(max_new_tokens=LONG, min_new_tokens=LONG)))
        streamed = list(next(in_flight).chunk.token_ids)

        # Publish v2 as the exporter does (a rename into the repository) and swap it in.
        os.rename(v2, repository / "tiny-lm" / "2")
        assert server.call(server.app.registry.refresh()) == [("tiny-lm", 2)]
        fresh = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the cat"))
        assert (fresh.version, fresh.state_bytes) == (2, GRU_STATE_BYTES)

        # The generation that was running goes on, on v1, until it is cancelled; its tokens stay in the session.
        assert server.app.registry.models()[0].loaded_versions == (2,)  # v1 is retired, draining
        for response in in_flight:
            streamed += response.chunk.token_ids
            if len(streamed) >= 40:
                in_flight.cancel()
                break

        # The session is still on v1 (loaded again on demand), fed and continued as v1 would.
        stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" sat"))
        options = S(max_new_tokens=20, min_new_tokens=20)
        responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(session_id=session.session_id,
                                                                            options=options)))
        assert responses[-1].done.version == 1
        v1 = list(stub.Generate(pb.GenerateRequest(model="tiny-lm", version=1, prompt="the cat sat", options=options)))
        assert ids_of(responses) == ids_of(v1) and responses[-1].done.text == v1[-1].done.text
        info = stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
        assert (info.version, info.state_bytes, info.tokens_consumed) == (1, LSTM_STATE_BYTES, 11 + 20)

        # The two versions really differ: the same text scores differently in the v1 and the v2 session.
        v1_scores = stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" on", return_log_probs=True))
        v2_scores = stub.Feed(pb.FeedRequest(session_id=fresh.session_id, text=" on", return_log_probs=True))
        assert not np.allclose([p.log_prob for p in v1_scores.token_log_probs],
                               [p.log_prob for p in v2_scores.token_log_probs])

        # The interrupted v1 session continues as v1 continues its text.
        generated = stub.GetSession(pb.GetSessionRequest(session_id=busy)).tokens_consumed - len("a big")
        assert LONG > generated >= len(streamed)  # cancelled after the swap, not finished before it
        count = S(max_new_tokens=generated + 10, min_new_tokens=generated + 10)
        whole = ids_of(stub.Generate(pb.GenerateRequest(model="tiny-lm", version=1, prompt="a big", options=count)))
        rest = ids_of(stub.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=busy, options=S(max_new_tokens=10, min_new_tokens=10))))
        assert streamed == whole[: len(streamed)] and rest == whole[generated:]
        assert stub.GetSession(pb.GetSessionRequest(session_id=busy)).version == 1
