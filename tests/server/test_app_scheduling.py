"""Reuse and urgency through a real server: the prefix cache's savings on /metrics, the `priority` field of
every request that decodes (a higher one parks a running stream, which goes on unchanged), and a priority out
of range refused naming the field."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from seqserve.v1 import service_pb2 as pb
from server.app import ServerThread
from server.config import ServerConfig

REPOSITORY = Path(__file__).resolve().parents[2] / "models"  # fortunes-lm (char LSTM) and g2p-en
S = pb.DecodingOptions
ENDLESS = S(max_new_tokens=100_000, min_new_tokens=100_000)  # runs until the test cancels it


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(repository=str(REPOSITORY), port=0, metrics_port=-1, poll_interval_seconds=0,
                          log_level="warning", max_rows_per_step=1, max_beam_size=1, default_beam_size=1,
                          max_new_tokens=100_000, intra_op_threads=1)
    with ServerThread(config) as running:
        yield running


def metric(server, name: str, **labels) -> float:
    return server.app.metrics.registry.get_sample_value(name, {"model": "fortunes-lm", **labels}) or 0.0


def text_of(responses) -> str:
    return "".join(r.chunk.text for r in responses if r.HasField("chunk"))


def test_a_repeated_prompt_is_served_from_the_prefix_cache(server, stub):
    prompt = "The best way to predict the future is to invent it. "
    request = pb.GenerateRequest(model="fortunes-lm", prompt=prompt, options=S(max_new_tokens=12))
    first = list(stub.Generate(request))
    # The first repeat finds the prompt's path (kept after it) and keeps the state before its last token.
    second = list(stub.Generate(request))
    computed = metric(server, "seqserve_prefill_tokens_total")
    saved = metric(server, "seqserve_prefix_cache_hit_tokens_total")
    again = list(stub.Generate(request))
    assert text_of(again) == text_of(second) == text_of(first) and again[-1].done.text == first[-1].done.text
    # <bos> and the prompt's characters: all but the last came from the cache.
    assert metric(server, "seqserve_prefix_cache_hit_tokens_total") - saved == len(prompt)
    assert metric(server, "seqserve_prefill_tokens_total") - computed == 1
    assert metric(server, "seqserve_prefix_cache_bytes") > 0


def test_a_higher_priority_generate_parks_a_running_stream_which_goes_on_unchanged(server, stub):
    """One row: the high-priority request takes it from the running stream at once, and the stream's text
    is, token for token, the one it has alone."""
    low = pb.GenerateRequest(model="fortunes-lm", prompt="Once upon a time", options=ENDLESS)
    running = stub.Generate(low)
    read = [next(running) for _ in range(3)]
    preempted = metric(server, "seqserve_preemptions_total")
    high = list(stub.Generate(pb.GenerateRequest(model="fortunes-lm", prompt="Quick!", options=S(max_new_tokens=5),
                                                 priority=5)))
    assert high[-1].done.generated_tokens == 5
    assert metric(server, "seqserve_preemptions_total") == preempted + 1
    tokens = sum(len(r.chunk.token_ids) for r in read)
    target = tokens + 40  # well past the moment it was parked
    while tokens < target:
        read.append(next(running))
        tokens += len(read[-1].chunk.token_ids)
    running.cancel()

    alone = stub.Generate(low)
    reference, count = [], 0
    while count < tokens:
        reference.append(next(alone))
        count += len(reference[-1].chunk.token_ids)
    alone.cancel()
    ids = [t for r in read for t in r.chunk.token_ids]
    expected = [t for r in reference for t in r.chunk.token_ids]
    assert ids[:tokens] == expected[:tokens]
    assert metric(server, "seqserve_parked_rows") == 0
    assert metric(server, "seqserve_queue_wait_seconds_count", priority="5") >= 1


def test_a_priority_out_of_range_is_invalid_argument_naming_the_field(stub):
    session = stub.CreateSession(pb.CreateSessionRequest(model="fortunes-lm", prefix="Hello"))
    calls = [
        (stub.Generate, pb.GenerateRequest(model="fortunes-lm", prompt="a", priority=11), 11),
        (stub.Translate, pb.TranslateRequest(model="g2p-en", sources=["cat"], priority=-11), -11),
        (stub.TranslateStream, pb.TranslateStreamRequest(model="g2p-en", source="cat", priority=99), 99),
        (stub.GenerateInSession, pb.GenerateInSessionRequest(session_id=session.session_id, priority=-99), -99),
    ]
    for call, request, value in calls:
        with pytest.raises(grpc.RpcError) as caught:
            result = call(request)
            if not isinstance(result, pb.TranslateResponse):
                list(result)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (f"priority must be an integer in [-10, 10] (higher is sooner, 0 is the "
                                          f"default), got {value}")
    # In range, a session's generation takes its priority like any other request.
    done = list(stub.GenerateInSession(pb.GenerateInSessionRequest(session_id=session.session_id, priority=10,
                                                                   options=S(max_new_tokens=3))))
    assert done[-1].done.generated_tokens == 3


def test_translations_take_a_priority(server, stub):
    plain = stub.Translate(pb.TranslateRequest(model="g2p-en", sources=["cat", "dog"]))
    urgent = stub.Translate(pb.TranslateRequest(model="g2p-en", sources=["cat", "dog"], priority=-3))
    assert urgent.translations == plain.translations
    streamed = list(stub.TranslateStream(pb.TranslateStreamRequest(model="g2p-en", source="cat", priority=4)))
    assert streamed[-1].done.translation.hypotheses[0].text == plain.translations[0].hypotheses[0].text
    waited = server.app.metrics.registry.get_sample_value
    assert waited("seqserve_queue_wait_seconds_count", {"model": "g2p-en", "priority": "-3"}) == 2
