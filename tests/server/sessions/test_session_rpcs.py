"""Session RPCs and Converse against a real server (127.0.0.1, port 0) on a tiny trained LSTM bundle.

A session's text decodes exactly as one Generate over the same text (Generate itself is checked against
the PyTorch reference decoders in tests/server/test_app_rpcs.py); Feed's log-probs are checked against
the PyTorch model directly.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from google.rpc import code_pb2

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from server.app import ServerThread
from server.config import ServerConfig
from training.batching import BOS
from training.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint, tokenizers_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))
S = pb.DecodingOptions
LSTM_STATE_BYTES = 2 * 2 * 12 * 4  # (h, c), each [1, layers=2, hidden=12] float32


@pytest.fixture(scope="module")
def run(tiny_runs):
    return tiny_runs["lstm", "lm"]


@pytest.fixture(scope="module")
def server(lm_repository, tiny_runs):
    export_run(tiny_runs["gru", "seq2seq"], lm_repository, "tiny-g2p", options=SMALL_EXPORT)
    config = ServerConfig(repository=str(lm_repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          max_new_tokens=2000, max_input_tokens=64, log_level="warning")
    with ServerThread(config) as running:
        yield running


def create(stub, prefix: str = "", **fields) -> pb.Session:
    return stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix=prefix, **fields))


def feed(stub, session: pb.Session | str, text: str, **fields) -> pb.FeedResponse:
    session_id = session if isinstance(session, str) else session.session_id
    return stub.Feed(pb.FeedRequest(session_id=session_id, text=text, **fields))


def generate_in(stub, session: pb.Session | str, leave_session_unchanged: bool = False, **options):
    """(token ids, done) of one GenerateInSession stream."""
    session_id = session if isinstance(session, str) else session.session_id
    responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session_id, options=S(**options), leave_session_unchanged=leave_session_unchanged)))
    assert all(r.HasField("chunk") for r in responses[:-1]) and responses[-1].HasField("done")
    return [t for r in responses[:-1] for t in r.chunk.token_ids], responses[-1].done


def generate(stub, prompt: str, **options):
    """(token ids, done) of one Generate stream: the reference a session must match."""
    responses = list(stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt=prompt, options=S(**options))))
    return [t for r in responses[:-1] for t in r.chunk.token_ids], responses[-1].done


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args)
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    return caught.value


# --- every RPC -------------------------------------------------------------------------------------------

def test_every_session_rpc(stub):
    before = time.time()
    session = create(stub, "the ")
    assert len(session.session_id) == 32 and int(session.session_id, 16) >= 0  # 128 random bits, hex
    assert (session.model, session.version, session.tokens_consumed) == ("tiny-lm", 1, 4)
    assert session.ttl_seconds == 600 and session.state_bytes == LSTM_STATE_BYTES and not session.generating
    assert before - 1 <= session.created_at.ToNanoseconds() / 1e9 <= time.time() + 1
    assert session.expires_at.ToSeconds() - session.last_used_at.ToSeconds() in (599, 600, 601)

    fed = feed(stub, session, "cat")
    assert (fed.tokens_fed, fed.tokens_consumed, len(fed.token_log_probs)) == (3, 7, 0)

    tokens, done = generate_in(stub, session, max_new_tokens=5, min_new_tokens=5)
    assert len(tokens) == done.generated_tokens == 5 and done.finish_reason == pb.FINISH_REASON_LENGTH
    assert (done.prompt_tokens, done.session_tokens_consumed, done.model, done.version) == (0, 12, "tiny-lm", 1)

    got = stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    assert (got.session_id, got.tokens_consumed, got.version, got.state_bytes) == (session.session_id, 12, 1,
                                                                                   LSTM_STATE_BYTES)
    assert 0 <= got.idle_seconds < 5 and got.age_seconds >= got.idle_seconds and not got.generating
    assert got.created_at == session.created_at
    assert got.last_used_at.ToNanoseconds() >= session.last_used_at.ToNanoseconds()

    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=session.session_id, ttl_seconds=30))
    assert fork.session_id != session.session_id and (fork.tokens_consumed, fork.ttl_seconds) == (12, 30)

    closed = stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id)).session
    assert (closed.session_id, closed.tokens_consumed) == (session.session_id, 12)
    for call, request in ((stub.GetSession, pb.GetSessionRequest(session_id=session.session_id)),
                          (stub.Feed, pb.FeedRequest(session_id=session.session_id, text="x")),
                          (stub.CloseSession, pb.CloseSessionRequest(session_id=session.session_id)),
                          (stub.GenerateInSession, pb.GenerateInSessionRequest(session_id=session.session_id))):
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "was closed" in error.details()
    assert stub.GetSession(pb.GetSessionRequest(session_id=fork.session_id)).tokens_consumed == 12  # the fork lives on
    stub.CloseSession(pb.CloseSessionRequest(session_id=fork.session_id))


def test_errors_name_what_is_wrong(stub):
    cases = [
        (stub.GetSession, pb.GetSessionRequest(session_id="0" * 32), grpc.StatusCode.NOT_FOUND, "unknown session"),
        (stub.Feed, pb.FeedRequest(session_id="", text="a"), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (stub.CreateSession, pb.CreateSessionRequest(model="tiny-g2p"), grpc.StatusCode.FAILED_PRECONDITION,
         "language model"),
        (stub.CreateSession, pb.CreateSessionRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (stub.CreateSession, pb.CreateSessionRequest(model="tiny-lm", version=7), grpc.StatusCode.NOT_FOUND,
         "no version 7"),
        (stub.CreateSession, pb.CreateSessionRequest(model="tiny-lm", ttl_seconds=100_000),
         grpc.StatusCode.INVALID_ARGUMENT, "ttl_seconds must be in [0, 86400]"),
        (stub.CreateSession, pb.CreateSessionRequest(model="tiny-lm", prefix="a" * 65),
         grpc.StatusCode.INVALID_ARGUMENT, "prefix must be at most 64 tokens"),
    ]
    for call, request, code, text in cases:
        error = rpc_error(call, request)
        assert error.code() == code and text in error.details(), (request, error.details())
    session = create(stub)
    error = rpc_error(stub.Feed, pb.FeedRequest(session_id=session.session_id, text="a" * 65))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "text must be at most 64 tokens" in error.details()
    error = rpc_error(stub.GenerateInSession, pb.GenerateInSessionRequest(session_id=session.session_id,
                                                                          options=S(n_best=2)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.n_best" in error.details()
    # A failed operation leaves the session as it was.
    assert stub.GetSession(pb.GetSessionRequest(session_id=session.session_id)).tokens_consumed == 0


# --- a session decodes as one generation over its whole text -------------------------------------------

@pytest.mark.parametrize("options", [
    {},
    {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
    {"strategy": S.STRATEGY_SAMPLE, "seed": 99, "temperature": 1.3},
], ids=["greedy", "penalties", "sampling"])
def test_feed_then_generate_equals_generate_on_the_concatenated_prompt(stub, options):
    whole, whole_done = generate(stub, "the cat sat on", max_new_tokens=40, min_new_tokens=40, **options)
    for prefix, pieces in (("the c", ["at s", "at on"]), ("", ["the cat sat on"]), ("the cat sat on", [])):
        session = create(stub, prefix)
        for piece in pieces:
            feed(stub, session, piece)
        tokens, done = generate_in(stub, session, max_new_tokens=40, min_new_tokens=40, **options)
        assert tokens == whole and done.text == whole_done.text, (prefix, pieces)

    # Generated text becomes part of the session: two generations in a row equal one long one.
    session = create(stub, "the cat sat on")
    first, first_done = generate_in(stub, session, max_new_tokens=15, min_new_tokens=15, **options)
    assert first == whole[:15]
    if "seed" in options:
        return  # a second sampled request draws from its own seeded stream, not the first one's
    second, second_done = generate_in(stub, session, max_new_tokens=25, min_new_tokens=25, **options)
    assert first + second == whole and first_done.text + second_done.text == whole_done.text
    assert second_done.session_tokens_consumed == len("the cat sat on") + 40


def test_generation_ends_with_eos_in_the_session_and_stop_strings_keep_their_tokens(stub):
    whole, whole_done = generate(stub, "a big dog", max_new_tokens=60)
    session = create(stub, "a big dog")
    tokens, done = generate_in(stub, session, max_new_tokens=60)
    assert tokens == whole and done.finish_reason == whole_done.finish_reason
    eos = 1 if done.finish_reason == pb.FINISH_REASON_EOS else 0
    assert done.session_tokens_consumed == len("a big dog") + len(tokens) + eos

    text = generate(stub, "the", max_new_tokens=30, min_new_tokens=30)[1].text
    stop = text[10:12]
    session = create(stub, "the")
    tokens, done = generate_in(stub, session, max_new_tokens=30, min_new_tokens=30, stop=[stop])
    assert done.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE and done.text == text[: text.find(stop)]
    # The session holds every generated token, the stop string's included: it goes on from there.
    rest, _ = generate_in(stub, session, max_new_tokens=30 - len(tokens), min_new_tokens=30 - len(tokens))
    assert tokens + rest == generate(stub, "the", max_new_tokens=30, min_new_tokens=30)[0]


def test_beam_search_in_a_session(stub):
    options = dict(strategy=S.STRATEGY_BEAM, beam_size=3, max_new_tokens=12, min_new_tokens=12)
    whole, whole_done = generate(stub, "the dog", **options)
    session = create(stub, "the d")
    feed(stub, session, "og")
    tokens, done = generate_in(stub, session, **options)
    assert tokens == whole and done.text == whole_done.text and done.session_tokens_consumed == 7 + 12
    # The beam's best hypothesis is in the session (read in by a batched prefill): greedy goes on from it.
    after, _ = generate_in(stub, session, max_new_tokens=10, min_new_tokens=10)
    reference = create(stub, "the dog" + whole_done.text)
    assert after == generate_in(stub, reference, max_new_tokens=10, min_new_tokens=10)[0]


def test_leave_session_unchanged(stub):
    session = create(stub, "the cat")
    first, done = generate_in(stub, session, leave_session_unchanged=True, max_new_tokens=10, min_new_tokens=10)
    assert done.session_tokens_consumed == 7
    assert stub.GetSession(pb.GetSessionRequest(session_id=session.session_id)).tokens_consumed == 7
    again, _ = generate_in(stub, session, max_new_tokens=10, min_new_tokens=10)
    assert again == first


def test_feed_log_probs_match_the_pytorch_model(stub, run):
    payload = load_checkpoint(find_checkpoint(run))
    model, text = model_from_checkpoint(payload), tokenizers_from_checkpoint(payload)["text"]
    session = create(stub)
    first = feed(stub, session, "the cat", return_log_probs=True)
    second = feed(stub, session, " sat", return_log_probs=True)
    ids = [BOS, *text.encode("the cat sat").ids]
    with torch.no_grad():
        log_probs = model(torch.tensor([ids[:-1]]), torch.tensor([len(ids) - 1]), *model.initial_state(1))[0][0]
    expected = log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    got = [p.log_prob for p in (*first.token_log_probs, *second.token_log_probs)]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [p.token_id for p in (*first.token_log_probs, *second.token_log_probs)] == ids[1:]
    assert "".join(p.token for p in first.token_log_probs) == "the cat"
    assert (first.tokens_fed, second.tokens_fed, second.tokens_consumed) == (7, 4, 11)
    assert feed(stub, session, "").tokens_fed == 0  # nothing to read: nothing changes


def test_fork_evolves_independently(stub):
    original = create(stub, "the ")
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=original.session_id))
    assert fork.ttl_seconds == original.ttl_seconds and fork.tokens_consumed == original.tokens_consumed
    sampled = dict(strategy=S.STRATEGY_SAMPLE, seed=7, max_new_tokens=12, leave_session_unchanged=True)
    assert generate_in(stub, original, **sampled)[0] == generate_in(stub, fork, **sampled)[0]

    a = feed(stub, original, "cat", return_log_probs=True)
    b = feed(stub, fork, "dog", return_log_probs=True)
    assert [p.log_prob for p in a.token_log_probs] != [p.log_prob for p in b.token_log_probs]
    # Different text read: different states, so the same next text scores differently...
    a_next = [p.log_prob for p in feed(stub, original, " sat", return_log_probs=True).token_log_probs]
    b_next = [p.log_prob for p in feed(stub, fork, " sat", return_log_probs=True).token_log_probs]
    assert not np.allclose(a_next, b_next)
    # ...and each continues exactly as its own text does.
    for session, prompt in ((original, "the cat sat"), (fork, "the dog sat")):
        assert generate_in(stub, session, max_new_tokens=20, min_new_tokens=20)[0] == \
            generate(stub, prompt, max_new_tokens=20, min_new_tokens=20)[0]


# --- Converse --------------------------------------------------------------------------------------------

class Conversation:
    """A Converse stream driven step by step: `send` requests, `take` responses."""

    def __init__(self, stub):
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._call = stub.Converse(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        try:
            for response in self._call:
                self._responses.put(response)
        finally:
            self._responses.put(None)

    def send(self, tag: str, **operation) -> None:
        self._requests.put(pb.ConverseRequest(request_tag=tag, **operation))

    def take(self, count: int) -> list[pb.ConverseResponse]:
        return [self._responses.get(timeout=30) for _ in range(count)]

    def close(self) -> list[pb.ConverseResponse]:
        """Half-close; every response still owed."""
        self._requests.put(None)
        rest = []
        while (response := self._responses.get(timeout=30)) is not None:
            rest.append(response)
        return rest


def test_converse_carries_every_operation_in_order(stub):
    talk = Conversation(stub)
    talk.send("a", create_session=pb.CreateSessionRequest(model="tiny-lm", prefix="the c"))
    talk.send("b", create_session=pb.CreateSessionRequest(model="tiny-lm", prefix="a big"))
    created = {r.request_tag: r.create_session for r in talk.take(2)}
    a, b = created["a"].session_id, created["b"].session_id

    long = S(max_new_tokens=12, min_new_tokens=12)
    # Pipelined without waiting: each session's operations apply in the order sent.
    talk.send("a1", feed=pb.FeedRequest(session_id=a, text="at"))
    talk.send("a2", generate=pb.GenerateInSessionRequest(session_id=a, options=long))
    talk.send("a3", get=pb.GetSessionRequest(session_id=a))
    talk.send("b1", feed=pb.FeedRequest(session_id=b, text=" dog", return_log_probs=True))
    talk.send("b2", generate=pb.GenerateInSessionRequest(session_id=b, options=long, leave_session_unchanged=True))
    talk.send("a4", fork=pb.ForkSessionRequest(session_id=a))
    talk.send("x1", feed=pb.FeedRequest(session_id="f" * 32, text="zz"))
    talk.send("x2")  # no operation
    talk.send("a5", generate=pb.GenerateInSessionRequest(session_id=a, options=S(n_best=3)))
    talk.send("b3", close=pb.CloseSessionRequest(session_id=b))
    talk.send("b4", get=pb.GetSessionRequest(session_id=b))
    responses = talk.close()

    def of(prefix):
        return [r for r in responses if r.request_tag.startswith(prefix)]

    a_tags = [r.request_tag for r in of("a")]
    assert a_tags == sorted(a_tags, key=lambda t: int(t[1:]))  # in the order sent, chunks of a2 before a3
    assert [r.request_tag for r in of("b")] == sorted((r.request_tag for r in of("b")), key=lambda t: int(t[1:]))
    answers = {r.request_tag: r for r in responses if not r.generate.HasField("chunk")}

    assert answers["a1"].feed.tokens_consumed == 7
    a_tokens = [t for r in of("a2") if r.generate.HasField("chunk") for t in r.generate.chunk.token_ids]
    assert a_tokens == generate(stub, "the cat", max_new_tokens=12, min_new_tokens=12)[0]
    assert answers["a2"].generate.done.session_tokens_consumed == 7 + 12
    assert answers["a3"].get.tokens_consumed == 19 and answers["a4"].fork.tokens_consumed == 19
    assert len(answers["b1"].feed.token_log_probs) == 4
    b_tokens = [t for r in of("b2") if r.generate.HasField("chunk") for t in r.generate.chunk.token_ids]
    assert b_tokens == generate(stub, "a big dog", max_new_tokens=12, min_new_tokens=12)[0]
    assert answers["b2"].generate.done.session_tokens_consumed == 9
    assert answers["b3"].close.session.tokens_consumed == 9

    errors = {tag: answers[tag].error for tag in ("x1", "x2", "a5", "b4")}
    assert errors["x1"].code == code_pb2.NOT_FOUND and "unknown session" in errors["x1"].message
    assert errors["x2"].code == code_pb2.INVALID_ARGUMENT and "operation" in errors["x2"].message
    assert errors["a5"].code == code_pb2.INVALID_ARGUMENT and "n_best" in errors["a5"].message
    assert errors["a5"].details  # the rich details of the unary status (ErrorInfo, BadRequest)
    assert errors["b4"].code == code_pb2.NOT_FOUND and "was closed" in errors["b4"].message
