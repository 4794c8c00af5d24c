"""kill -9: clients feed many sessions of a real `seqserve serve` process; the process is killed with SIGKILL
at a random point (after a random number of acknowledged feeds, with feeds in flight) and restarted on the
same store (a real SQLite file; a real redis-server). Every acknowledged Feed is in its session: its tokens
are counted, and the greedy continuation equals the PyTorch reference decoder's for the acknowledged text.
A feed in flight at the kill is applied at most once when retried with its request_id."""

from __future__ import annotations

import random
import threading
import uuid

import grpc
import pytest
import torch
from live_services import ServeProcess

from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from training.batching import BOS, EOS
from training.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint, tokenizers_from_checkpoint
from training.models.decoding import greedy_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SESSIONS, WRITERS, NEW_TOKENS = 8, 4, 12
LETTERS = "the cat sat on a mat dog ran"


@pytest.fixture(scope="module")
def reference(tiny_runs):
    payload = load_checkpoint(find_checkpoint(tiny_runs["lstm", "lm"]))
    return model_from_checkpoint(payload), tokenizers_from_checkpoint(payload)["text"]


def reference_continuation(reference, text: str) -> list[int]:
    model, tokenizer = reference
    with torch.no_grad():
        start, state = model.prefill([[BOS, *tokenizer.encode(text).ids]])
        hypothesis = greedy_decode(model.step_fn(), state, start, eos_id=EOS, max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS)[0]
    return list(hypothesis.tokens)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_every_acknowledged_feed_survives_kill_9(store, lm_repository, tmp_path, reference, request):
    if store == "sqlite":
        url = f"sqlite:{tmp_path}/state/sessions.db"
    else:
        redis = request.getfixturevalue("redis_server")
        redis.flush()
        url = redis.url
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    kill_after = rng.randint(10, 60)  # acknowledged feeds before the kill

    server = ServeProcess(lm_repository, session_store=url)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SeqserveStub(channel)
            sessions = {}  # id -> {"text": acknowledged text, "flight": (text, request_id) or None}
            for index in range(SESSIONS):
                prefix = LETTERS[index:index + 5]
                answer = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix=prefix))
                sessions[answer.session_id] = {"text": prefix, "flight": None}
            acknowledged = 0
            lock = threading.Lock()
            killed = threading.Event()

            def write(ids: list[str], writer_seed: int) -> None:
                nonlocal acknowledged
                local = random.Random(writer_seed)
                while not killed.is_set():
                    session_id = local.choice(ids)
                    text = "".join(local.choice(LETTERS) for _ in range(local.randint(1, 5)))
                    request_id = uuid.uuid4().hex
                    sessions[session_id]["flight"] = (text, request_id)
                    try:
                        stub.Feed(pb.FeedRequest(session_id=session_id, text=text, request_id=request_id),
                                  timeout=60)
                    except grpc.RpcError:
                        assert killed.is_set(), "a feed failed before the kill"
                        return  # the in-flight feed stays recorded
                    with lock:
                        sessions[session_id]["text"] += text
                        sessions[session_id]["flight"] = None
                        acknowledged += 1
                        if acknowledged != kill_after:
                            continue
                        killed.set()
                    # One more feed on its way as the process dies: applied or not, never in part.
                    text = "".join(local.choice(LETTERS) for _ in range(local.randint(1, 5)))
                    request_id = uuid.uuid4().hex
                    sessions[session_id]["flight"] = (text, request_id)
                    last = stub.Feed.future(pb.FeedRequest(session_id=session_id, text=text, request_id=request_id))
                    server.kill()
                    try:
                        last.result(timeout=60)
                        sessions[session_id]["text"] += text  # it was answered before the process died
                        sessions[session_id]["flight"] = None
                    except grpc.RpcError:
                        pass
                    return

            ids = list(sessions)
            writers = [threading.Thread(target=write, args=(ids[w::WRITERS], seed + w)) for w in range(WRITERS)]
            for thread in writers:
                thread.start()
            for thread in writers:
                thread.join(timeout=300)
            assert killed.is_set() and acknowledged >= kill_after, f"seed {seed}"
    finally:
        server.kill()

    restarted = ServeProcess(lm_repository, session_store=url)
    try:
        with grpc.insecure_channel(restarted.target) as channel:
            stub = pb_grpc.SeqserveStub(channel)
            tokenizer = reference[1]
            in_flight = 0
            for session_id, session in sessions.items():
                count = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_consumed
                acked = len(tokenizer.encode(session["text"]).ids)
                if session["flight"] is not None:  # in flight at the kill: applied or not, never in part
                    text, request_id = session["flight"]
                    assert count in (acked, acked + len(tokenizer.encode(text).ids)), f"seed {seed}"
                    answer = stub.Feed(pb.FeedRequest(session_id=session_id, text=text, request_id=request_id))
                    session["text"] += text
                    acked = len(tokenizer.encode(session["text"]).ids)
                    assert answer.tokens_consumed == acked, f"seed {seed}: the retry was applied twice or never"
                    in_flight += 1
                else:
                    assert count == acked, f"seed {seed}: session {session_id} lost an acknowledged feed"
                responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
                    session_id=session_id, leave_session_unchanged=True,
                    options=pb.DecodingOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))))
                generated = [t for r in responses[:-1] for t in r.chunk.token_ids]
                assert generated == reference_continuation(reference, session["text"]), f"seed {seed}"
    finally:
        restarted.stop()
