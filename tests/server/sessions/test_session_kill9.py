"""kill -9: clients feed (and now and then generate in) many sessions of a real `seqserve serve` process;
the process is killed with SIGKILL at a random point (after a random number of acknowledged operations,
with operations in flight) and restarted on the same store (a real SQLite file; a real redis-server).
Every acknowledged Feed and every generation whose `done` arrived is in its session: its tokens are
counted, and the greedy continuation equals the PyTorch reference decoder's for the acknowledged text.
An operation in flight at the kill was applied whole or not at all, and a retry with its request_id
applies it once."""

from __future__ import annotations

import random
import threading
import uuid

import grpc
import pytest
import torch

from bench.services import ServeProcess
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from training.batching import BOS, EOS
from training.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint, tokenizers_from_checkpoint
from training.models.decoding import greedy_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SESSIONS, WRITERS, NEW_TOKENS, GENERATED = 8, 4, 12, 3
LETTERS = "the cat sat on a mat dog ran"


@pytest.fixture(scope="module")
def reference(tiny_runs):
    payload = load_checkpoint(find_checkpoint(tiny_runs["lstm", "lm"]))
    return model_from_checkpoint(payload), tokenizers_from_checkpoint(payload)["text"]


def reference_continuation(reference, ids: list[int]) -> list[int]:
    model, _ = reference
    with torch.no_grad():
        start, state = model.prefill([[BOS, *ids]])
        hypothesis = greedy_decode(model.step_fn(), state, start, eos_id=EOS, max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS)[0]
    return list(hypothesis.tokens)


def operation(stub, session_id: str, op: tuple, **call):
    """Send one operation ("feed", text, request_id) or ("generate", None, request_id); the token ids it
    added to the session."""
    kind, text, request_id = op
    if kind == "feed":
        stub.Feed(pb.FeedRequest(session_id=session_id, text=text, request_id=request_id), **call)
        return None  # the caller knows the fed ids
    responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session_id, request_id=request_id,
        options=pb.DecodingOptions(max_new_tokens=GENERATED, min_new_tokens=GENERATED)), **call))
    assert responses[-1].HasField("done")
    return [t for r in responses[:-1] for t in r.chunk.token_ids]


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_every_acknowledged_operation_survives_kill_9(store, lm_repository, tmp_path, reference, request):
    if store == "sqlite":
        url = f"sqlite:{tmp_path}/state/sessions.db"
    else:
        redis = request.getfixturevalue("redis_server")
        redis.flush()
        url = redis.url
    tokenizer = reference[1]
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    kill_after = rng.randint(10, 60)  # acknowledged operations before the kill

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    sessions = {}  # id -> {"ids": acknowledged token ids after <bos>, "flight": operation in flight or None}
    server = ServeProcess(lm_repository, session_store=url)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SeqserveStub(channel)
            for index in range(SESSIONS):
                prefix = LETTERS[index:index + 5]
                answer = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix=prefix))
                sessions[answer.session_id] = {"ids": encode(prefix), "flight": None}
            acknowledged = 0
            lock = threading.Lock()
            killed = threading.Event()

            def next_operation(local: random.Random) -> tuple:
                if local.random() < 0.25:
                    return "generate", None, uuid.uuid4().hex
                return "feed", "".join(local.choice(LETTERS) for _ in range(local.randint(1, 5))), uuid.uuid4().hex

            def applied(session: dict, op: tuple, generated) -> None:
                session["ids"] += encode(op[1]) if op[0] == "feed" else generated
                session["flight"] = None

            def write(ids: list[str], writer_seed: int) -> None:
                nonlocal acknowledged
                local = random.Random(writer_seed)
                while not killed.is_set():
                    session_id = local.choice(ids)
                    op = sessions[session_id]["flight"] = next_operation(local)
                    try:
                        generated = operation(stub, session_id, op, timeout=60)
                    except grpc.RpcError:
                        assert killed.is_set(), "an operation failed before the kill"
                        return  # the operation in flight stays recorded
                    with lock:
                        applied(sessions[session_id], op, generated)
                        acknowledged += 1
                        if acknowledged != kill_after:
                            continue
                        killed.set()
                    # One more feed on its way as the process dies: applied or not, never in part.
                    op = sessions[session_id]["flight"] = ("feed", "".join(local.choice(LETTERS) for _ in range(5)),
                                                           uuid.uuid4().hex)
                    last = stub.Feed.future(pb.FeedRequest(session_id=session_id, text=op[1], request_id=op[2]))
                    server.kill()
                    try:
                        last.result(timeout=60)
                        applied(sessions[session_id], op, None)  # answered before the process died
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
            for session_id, session in sessions.items():
                count = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_consumed
                acked = len(session["ids"])
                op = session["flight"]
                if op is not None:  # in flight at the kill: applied whole or not at all
                    whole = len(encode(op[1])) if op[0] == "feed" else GENERATED
                    assert count in (acked, acked + whole), f"seed {seed}: {op[0]} applied in part"
                    generated = operation(stub, session_id, op)  # the retry: applied once
                    applied(session, op, generated)
                    count = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).tokens_consumed
                assert count == len(session["ids"]), f"seed {seed}: session {session_id} lost or doubled tokens"
                responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
                    session_id=session_id, leave_session_unchanged=True,
                    options=pb.DecodingOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))))
                generated = [t for r in responses[:-1] for t in r.chunk.token_ids]
                assert generated == reference_continuation(reference, session["ids"]), f"seed {seed}"
    finally:
        restarted.stop()
