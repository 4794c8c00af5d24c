"""`seqserve serve` split into processes (a supervisor, one engine process, two API processes sharing the port)
keeps the single process's promises, shown on real servers over gRPC:

- its answers equal the single-process server's, token for token, whichever API process gives them;
- /metrics counts every call and every token once, whichever process handled it;
- a killed API process is started again while the other one serves; a killed engine process ends the
  streams in flight and refuses calls with UNAVAILABLE (never a hang) until it is back, and every session
  operation acknowledged before the kill is kept (SQLite);
- a Triton sequence reaches its session from any API process, also after one was restarted;
- seqserve's client retries session calls through an engine restart, applying each once;
- SIGTERM drains every process.

Every split server is started with SEQSERVE_API_PROCESSES=2, so this holds on any machine. Each call
carries a request id of its own, and the servers' JSON logs say which process answered it (every line of a
child process names its `process_role`; a call's line has its `rpc` and `code`). A channel here is one TCP
connection of its own (a local subchannel pool), so the kernel (SO_REUSEPORT) gives each new channel to one
of the API processes; a test that needs one on a given process opens channels until the logs show one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import signal
import threading
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live import Reader, wait_for
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from bench.services import ServeProcess, process_tree
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server import client as client_module
from server.api.errors import REQUEST_ID_HEADER
from server.app import ServerThread
from server.client import Client, ClientError, _Given
from server.config import ServerConfig

S = pb.DecodingOptions
API_ROLES = ("api-0", "api-1")
LOAD_LM = "load-lm"  # the tiny LM once more under a name only the metrics test calls, so its counts are its own
ENDLESS_TOKENS = 1_000_000  # every server's max_new_tokens: no machine reaches it before a test ends the stream
CALL_SECONDS = 120  # every call's deadline: a hang fails as DEADLINE_EXCEEDED instead of stalling the suite
UP_SECONDS = 180  # how long a restarted process may take to serve again on a loaded machine
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)  # a channel that shares no connection with another
# A small HTTP/2 window: the server cannot finish a long stream until its client reads it, so the call stays
# in flight for as long as the test wants.
SLOW_LINK = (("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0))
PROMPTS = ["the cat", "a big dog", ""]
SOURCES = ["abc", "hedge", "gag", "fade"]
SERVICE = "seqserve.v1.Seqserve"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


# --- servers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repository(export_tiny_models, tmp_path_factory) -> Path:
    repository = tmp_path_factory.mktemp("repository")
    export_tiny_models(repository, lm_names=("tiny-lm", LOAD_LM))
    return repository


def start_split(repository: Path, session_store: str = "memory", **settings) -> ServeProcess:
    """`seqserve serve` with two API processes and /metrics on a free port; `settings` are SEQSERVE_* values."""
    env = {"SEQSERVE_API_PROCESSES": "2", "SEQSERVE_METRICS_PORT": "0", "SEQSERVE_MAX_NEW_TOKENS": str(ENDLESS_TOKENS),
           **{f"SEQSERVE_{name.upper()}": str(value) for name, value in settings.items()}}
    server = ServeProcess(repository, session_store=session_store, env=env)
    assert sorted(process_roles(server)) == ["api-0", "api-1", "engine"]
    return server


def shut(server: ServeProcess) -> None:
    """SIGTERM (the supervisor reaps its processes at once), then SIGKILL to whatever is left: this machine's
    init reaps orphans only every few seconds."""
    server.stop()
    server.kill()


@pytest.fixture(scope="module")
def split(repository):
    """The split server of the tests that kill nothing."""
    server = start_split(repository)
    yield server
    shut(server)


@pytest.fixture(scope="module")
def single(repository):
    """The same repository served by one process, in this one (`ServerThread`), as the reference."""
    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          intra_op_threads=1, max_new_tokens=ENDLESS_TOKENS, log_level="warning")
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def single_caller(single):
    caller = Caller(f"127.0.0.1:{single.port}")
    yield caller
    caller.close()


@pytest.fixture(scope="module")
def split_callers(split):
    callers = callers_on(split)
    yield callers
    for caller in callers.values():
        caller.close()


def process_roles(server: ServeProcess) -> dict[str, int]:
    """role ("engine", "api-N") -> pid of the server's live processes, from /proc (a killed process that
    is not yet reaped has an empty command line, so it is not listed)."""
    found = {}
    for pid in process_tree(server.process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--role" in argv:
            found[argv[argv.index(b"--role") + 1].decode()] = pid
    return found


def serving_again(server: ServeProcess, role: str, old_pid: int) -> int | None:
    """Once the supervisor has started `role` again (a new pid) and it serves: the index in `server.events()`
    from which the new process's log lines come. None before."""
    pid = process_roles(server).get(role)
    if pid in (None, old_pid):
        return None
    ready = [i for i, e in enumerate(server.events()) if e.get("process_role") == role
             and e.get("event") in ("api_serving", "engine_ready")]
    return ready[-1] if len(ready) >= 2 else None  # the first process of the role logged the first one


def restarted(server: ServeProcess, role: str, old_pid: int) -> int:
    """Wait for `serving_again`."""
    return wait_for(lambda: serving_again(server, role, old_pid), UP_SECONDS,
                    f"the supervisor to start {role} again", pause=0.05)


def metrics(server: ServeProcess, name: str, **labels: str) -> dict[tuple, float]:
    """The samples of `name` on the supervisor's /metrics whose labels include `labels`, keyed by their
    other labels' values (sorted by label name)."""
    port = next(e["metrics_port"] for e in server.events() if e.get("event") == "serving")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                found[tuple(v for k, v in sorted(sample.labels.items()) if k not in labels)] = sample.value
    return found


def active_rows(server: ServeProcess) -> float:
    return metrics(server, "seqserve_active_rows", model="tiny-lm").get((), 0.0)


def freeze(server: ServeProcess):
    """SIGSTOP the supervisor: a process killed meanwhile stays down (nobody starts it again) until `thaw`."""
    os.kill(server.process.pid, signal.SIGSTOP)


def thaw(server: ServeProcess) -> None:
    os.kill(server.process.pid, signal.SIGCONT)


# --- calls and the logs that say who answered them --------------------------------------------------------------

def new_id() -> str:
    return uuid.uuid4().hex[:16]


class Caller:
    """Seqserve calls on a channel of its own; every call carries a request id of its own (the request's
    request_id when it has one, else x-request-id), kept in `ids`."""

    def __init__(self, target: str, options=()):
        self.channel = grpc.insecure_channel(target, options=[OWN_CONNECTION, *options])
        self.stub = pb_grpc.SeqserveStub(self.channel)
        self.ids: list[str] = []

    def __call__(self, method: str, request, **kwargs):
        request_id = getattr(request, "request_id", "") or new_id()
        self.ids.append(request_id)
        kwargs.setdefault("timeout", CALL_SECONDS)
        return getattr(self.stub, method)(request, metadata=[(REQUEST_ID_HEADER, request_id)], **kwargs)

    def code(self, method: str, request) -> str:
        """The status code name a call ends with (a stream read to its end)."""
        try:
            answer = self(method, request)
            if isinstance(answer, grpc.Call):  # a stream
                list(answer)
        except grpc.RpcError as error:
            return error.code().name
        return "OK"

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_SECONDS).status

    def close(self) -> None:
        self.channel.close()


def fresh_code(server: ServeProcess, method: str, request) -> str:
    """The status code of one call on a new connection."""
    caller = Caller(server.target)
    try:
        return caller.code(method, request)
    finally:
        caller.close()


def call_lines(server: ServeProcess, since: int = 0) -> list[dict]:
    """The call log lines (`rpc`, `code`, `request_id`, `process_role`) among the server's log from index `since`."""
    return [e for e in server.events()[since:] if "rpc" in e and "code" in e]


def served_by(server: ServeProcess, request_ids, since: int = 0) -> dict[str, str]:
    """request id -> the role of the process that logged its call (polled: a call is logged as it ends, just
    after its client has the answer)."""
    wanted = set(request_ids)

    def lookup():
        found = {e["request_id"]: e.get("process_role", "") for e in call_lines(server, since)
                 if e.get("request_id") in wanted}
        return found if len(found) == len(wanted) else None

    return wait_for(lookup, 60, f"the log lines of the calls {sorted(wanted)}", pause=0.05)


def callers_on(server: ServeProcess, roles=API_ROLES, since: int = 0, options=(), tries: int = 64
               ) -> dict[str, Caller]:
    """A Caller on each API process of `roles` (logging from index `since`): new channels until the kernel has
    given one to each. Every probe call must succeed."""
    found: dict[str, Caller] = {}
    for _ in range(tries):
        caller = Caller(server.target, options)
        caller("ListModels", pb.ListModelsRequest())
        role = served_by(server, caller.ids[-1:], since)[caller.ids[-1]]
        if role in roles and role not in found:
            found[role] = caller
        else:
            caller.close()
        if len(found) == len(roles):
            return found
    raise AssertionError(f"{tries} new connections reached only {sorted(found)} of {roles}")


# --- answers, compared -------------------------------------------------------------------------------------------

def collapsed(responses) -> list:
    """A stream's messages with its chunks joined into one: where the server coalesces tokens into one
    message depends on timing, the tokens, text and log-probs do not."""
    joined, text, rest = None, "", []
    for response in responses:
        if response.WhichOneof("event") == "chunk":
            joined = joined or pb.TokenChunk()
            text += response.chunk.text
            joined.MergeFrom(response.chunk)  # repeated fields append
        else:
            rest.append(response)
    if joined is not None:
        joined.text = text
        joined.first_token_index = 0
    return ([joined] if joined is not None else []) + rest


def comparable(answers) -> tuple[object, list[float]]:
    """(every field of `answers` (messages, nested lists of them) with the floats left out, the floats in
    order): token ids, text and finish reasons compare exactly, log-probs, scores and attention within a
    rounding error (ONNX Runtime may sum in another order for another batch)."""
    floats: list[float] = []

    def walk(value):
        if hasattr(value, "DESCRIPTOR"):
            value = json_format.MessageToDict(value, preserving_proto_field_name=True)
        if isinstance(value, float):
            floats.append(value)
            return "<float>"
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(item) for item in value]
        return value

    return walk(answers), floats


def assert_same(actual, expected, what: str) -> None:
    (fields, floats), (expected_fields, expected_floats) = comparable(actual), comparable(expected)
    assert fields == expected_fields, what
    assert floats == pytest.approx(expected_floats, abs=1e-4), what


def generate(prompt: str, model: str = "tiny-lm", **options) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, prompt=prompt, options=S(**options))


def endless(prompt: str = "the") -> pb.GenerateRequest:
    """A generation only its client or a fault ends."""
    return generate(prompt, max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)


SAMPLE, BEAM = S.STRATEGY_SAMPLE, S.STRATEGY_BEAM
# Each case: what a Caller's answers to some requests are (streams collapsed).
CASES = {
    "generate greedy": lambda call: [
        collapsed(call("Generate", generate(p, max_new_tokens=24, return_log_probs=True, top_log_probs=2)))
        for p in PROMPTS],
    "generate seeded sampling": lambda call: [
        collapsed(call("Generate", generate(p, **options))) for p in PROMPTS
        for options in ({"strategy": SAMPLE, "seed": 7, "temperature": 0.8, "top_k": 6, "top_p": 0.9,
                         "max_new_tokens": 24, "return_log_probs": True},
                        {"strategy": SAMPLE, "seed": 2**63 + 5, "temperature": 1.5, "max_new_tokens": 24})],
    "generate beam": lambda call: [
        collapsed(call("Generate", generate(p, **options))) for p in PROMPTS
        for options in ({"strategy": BEAM, "beam_size": 3, "length_penalty": 0.2, "max_new_tokens": 16},
                        {"strategy": BEAM, "beam_size": 5, "early_stopping": True, "max_new_tokens": 12})],
    "translate greedy": lambda call: call("Translate", pb.TranslateRequest(
        model="tiny-g2p", sources=SOURCES, options=S(return_log_probs=True))),
    "translate beam n-best": lambda call: call("Translate", pb.TranslateRequest(
        model="tiny-g2p", sources=SOURCES, options=S(strategy=BEAM, beam_size=4, n_best=3, length_penalty=0.6))),
    "translate stream": lambda call: [
        collapsed(call("TranslateStream", pb.TranslateStreamRequest(
            model="tiny-g2p", source=source, options=S(return_log_probs=True), return_attention=True)))
        for source in SOURCES],
}


def session_story(callers: list[Caller]) -> tuple[str, list]:
    """One session's operations, each on the next of `callers` in turn: create, feed with log-probs, a greedy
    generation, another feed, a seeded one. (The session id, every answer but the create's times.)"""
    turn = itertools.cycle(callers)
    created = next(turn)("CreateSession", pb.CreateSessionRequest(model="tiny-lm", prefix="the cat"))
    session_id = created.session_id
    answers = [created.tokens_consumed]
    answers.append(next(turn)("Feed", pb.FeedRequest(session_id=session_id, text=" sat on a", return_log_probs=True)))
    answers.append(collapsed(next(turn)("GenerateInSession", pb.GenerateInSessionRequest(
        session_id=session_id, options=S(max_new_tokens=8, min_new_tokens=8, return_log_probs=True)))))
    answers.append(next(turn)("Feed", pb.FeedRequest(session_id=session_id, text=" mat", return_log_probs=True)))
    answers.append(collapsed(next(turn)("GenerateInSession", pb.GenerateInSessionRequest(
        session_id=session_id, options=S(strategy=SAMPLE, seed=11, temperature=0.9, max_new_tokens=6,
                                         min_new_tokens=6)))))
    return session_id, answers


def session_now(caller: Caller, session_id: str) -> list:
    """What a session holds: its tokens_consumed, and the greedy continuation of its text (left unchanged)."""
    consumed = caller("GetSession", pb.GetSessionRequest(session_id=session_id)).tokens_consumed
    return [consumed, collapsed(caller("GenerateInSession", pb.GenerateInSessionRequest(
        session_id=session_id, leave_session_unchanged=True, options=S(max_new_tokens=12, min_new_tokens=12))))]


# --- the same answers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_each_api_process_answers_as_the_single_process_server(case, split, split_callers, single_caller):
    expected = CASES[case](single_caller)
    assert "'token_ids'" in repr(comparable(expected)[0])  # tokens to compare, not empty answers
    for role, caller in split_callers.items():
        first = len(caller.ids)
        assert_same(CASES[case](caller), expected, f"{case} from {role}")
        assert set(served_by(split, caller.ids[first:]).values()) == {role}


def test_a_session_used_from_both_api_processes_equals_the_single_process_servers(split, split_callers,
                                                                                  single_caller):
    expected_id, expected = session_story([single_caller])
    expected += session_now(single_caller, expected_id)
    callers = [split_callers[role] for role in API_ROLES]
    firsts = [len(caller.ids) for caller in callers]
    session_id, answers = session_story(callers)  # create on api-0, feed on api-1, generate on api-0, ...
    answers += session_now(callers[1], session_id)
    assert_same(answers, expected, "the session's answers")
    for role, caller, first in zip(API_ROLES, callers, firsts, strict=True):
        assert set(served_by(split, caller.ids[first:]).values()) == {role}


# --- /metrics ----------------------------------------------------------------------------------------------------

def load_call(index: int) -> tuple[str, object]:
    """The index-th call of the metrics test's load, all on LOAD_LM: streams (greedy, seeded, one refused),
    unary calls answered OK or NOT_FOUND, a session created in the engine process."""
    kind = index % 6
    if kind == 0:
        return "Generate", generate(PROMPTS[index % 3], LOAD_LM, max_new_tokens=4 + index % 9)
    if kind == 1:
        return "Generate", generate("a", LOAD_LM, strategy=SAMPLE, seed=index, max_new_tokens=3 + index % 5)
    if kind == 2:
        return "Generate", generate("a", LOAD_LM, strategy=SAMPLE, top_p=1.5)  # INVALID_ARGUMENT
    if kind == 3:
        return "GetModel", pb.GetModelRequest(model=LOAD_LM)
    if kind == 4:
        return "GetModel", pb.GetModelRequest(model=LOAD_LM, version=7)  # NOT_FOUND
    return "CreateSession", pb.CreateSessionRequest(model=LOAD_LM, prefix="a")


def test_metrics_count_every_call_and_token_once_under_load(split, split_callers):
    requests_before = metrics(split, "seqserve_requests_total", model=LOAD_LM)
    tokens_before = metrics(split, "seqserve_generated_tokens_total", model=LOAD_LM).get((), 0.0)
    callers = [*split_callers.values(), *(Caller(split.target) for _ in range(4))]
    firsts = [len(caller.ids) for caller in callers]
    counts: collections.Counter = collections.Counter()  # (code, rpc), as the metric's labels sort
    received = 0
    lock = threading.Lock()

    def load(caller: Caller, worker: int) -> None:
        nonlocal received
        for index in range(worker * 30, worker * 30 + 30):
            rpc, request = load_call(index)
            tokens = 0
            try:
                answer = caller(rpc, request)
                if rpc == "Generate":
                    *chunks, last = list(answer)
                    tokens = sum(len(r.chunk.token_ids) for r in chunks)
                    assert tokens == last.done.generated_tokens
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with lock:
                counts[code, rpc] += 1
                received += tokens

    with concurrent.futures.ThreadPoolExecutor(len(callers)) as pool:
        for future in [pool.submit(load, caller, worker) for worker, caller in enumerate(callers)]:
            future.result()
    assert {rpc_code for rpc_code in counts} == {("OK", "Generate"), ("INVALID_ARGUMENT", "Generate"),
                                                  ("OK", "GetModel"), ("NOT_FOUND", "GetModel"),
                                                  ("OK", "CreateSession")}
    roles = set()
    for caller, first in zip(callers, firsts, strict=True):
        roles |= set(served_by(split, caller.ids[first:]).values())
    assert roles == set(API_ROLES)  # both API processes counted some

    def moved() -> dict:
        now = metrics(split, "seqserve_requests_total", model=LOAD_LM)
        return {key: value - requests_before.get(key, 0.0) for key, value in now.items()
                if value != requests_before.get(key, 0.0)}

    # Each call is counted as it ends, just after its client has the answer: wait until all are in.
    wait_for(lambda: sum(moved().values()) >= sum(counts.values()), 60, "the calls to be counted", pause=0.1)
    assert moved() == dict(counts)
    generated = metrics(split, "seqserve_generated_tokens_total", model=LOAD_LM).get((), 0.0) - tokens_before
    assert received > 0 and generated == received
    for caller in callers[2:]:
        caller.close()


# --- a killed API process ----------------------------------------------------------------------------------------

def test_a_killed_api_process_is_started_again_while_the_other_serves(repository):
    server = start_split(repository)
    try:
        callers = callers_on(server)
        before = process_roles(server)
        doomed = Reader(callers["api-0"]("Generate", endless()))
        wait_for(lambda: doomed.responses, what="the stream on api-0 to decode")
        wait_for(lambda: active_rows(server) == 1, what="its row in the engine's batch")

        os.kill(before["api-0"], signal.SIGKILL)
        assert doomed.finished.wait(60), "the stream of the killed process hangs"
        assert doomed.error.code() == grpc.StatusCode.UNAVAILABLE, doomed.error
        # The supervisor says so once it has reaped it (its sockets closed): from then on new connections go to
        # the process that lives (until the new one listens beside it), and each call succeeds.
        wait_for(lambda: died(server), 60, "the supervisor to see the process die")
        answered = 0
        while answered < 5 or serving_again(server, "api-0", before["api-0"]) is None:
            assert fresh_code(server, "Generate", generate("a", max_new_tokens=3)) == "OK"
            answered += 1
            assert answered < 10_000, "api-0 was not started again"
        since = restarted(server, "api-0", before["api-0"])
        now = process_roles(server)
        assert now["api-0"] != before["api-0"] and {now["api-1"], now["engine"]} == {before["api-1"], before["engine"]}
        assert died(server) == ["api-0"]

        # After: calls on new connections succeed, on the new process too.
        fresh = callers_on(server, ("api-0",), since=since)["api-0"]
        assert fresh.code("Generate", generate("the", max_new_tokens=5)) == "OK"
        for _ in range(5):
            assert fresh_code(server, "Translate", pb.TranslateRequest(model="tiny-g2p", sources=["ab"])) == "OK"
        # The engine ended what the killed process had left running (its new self said hello).
        wait_for(lambda: active_rows(server) == 0, 60, "the killed process's row to leave the batch")
        assert callers["api-1"].code("Generate", generate("a", max_new_tokens=3)) == "OK"  # an old connection
    finally:
        shut(server)


def died(server: ServeProcess) -> list[str]:
    """The roles of the processes the supervisor saw die (and reaped), in order."""
    return [e["role"] for e in server.events() if e.get("event") == "process_died"]


# --- a killed engine process -------------------------------------------------------------------------------------

def outage_calls(session_id: str) -> list[tuple[str, object]]:
    """One call of every kind, for the time the engine process is down."""
    return [
        ("Generate", generate("the", max_new_tokens=3)),
        ("Translate", pb.TranslateRequest(model="tiny-g2p", sources=["ab"])),
        ("TranslateStream", pb.TranslateStreamRequest(model="tiny-g2p", source="ab")),
        ("ListModels", pb.ListModelsRequest()),
        ("GetModel", pb.GetModelRequest(model="tiny-lm")),
        ("CreateSession", pb.CreateSessionRequest(model="tiny-lm", prefix="x")),
        ("Feed", pb.FeedRequest(session_id=session_id, text=" never", request_id=new_id())),
        ("GetSession", pb.GetSessionRequest(session_id=session_id)),
        ("GenerateInSession", pb.GenerateInSessionRequest(session_id=session_id, request_id=new_id(),
                                                          options=S(max_new_tokens=3))),
        ("ForkSession", pb.ForkSessionRequest(session_id=session_id)),
        ("ExportSession", pb.ExportSessionRequest(session_id=session_id)),
    ]


def triton_outage(channel: grpc.Channel) -> dict[str, object]:
    """What the Open Inference Protocol answers while the engine process is down: not ready (an answer, as
    Triton gives it), and UNAVAILABLE for everything about a model."""
    stub = triton_grpc.GRPCInferenceServiceStub(channel)
    infer = triton_pb.ModelInferRequest(model_name="tiny-g2p")
    infer.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab")
    answers: dict[str, object] = {}
    for method, request in (("ServerReady", triton_pb.ServerReadyRequest()),
                            ("ModelReady", triton_pb.ModelReadyRequest(name="tiny-lm")),
                            ("ModelMetadata", triton_pb.ModelMetadataRequest(name="tiny-lm")),
                            ("RepositoryIndex", triton_pb.RepositoryIndexRequest()),
                            ("ModelInfer", infer)):
        try:
            answer = getattr(stub, method)(request, timeout=CALL_SECONDS)
            answers[method] = answer.ready if method.endswith("Ready") else "OK"
        except grpc.RpcError as error:
            answers[method] = error.code().name
    return answers


def test_a_killed_engine_process_makes_calls_unavailable_and_loses_no_session(repository, tmp_path, single_caller):
    expected_id, _ = session_story([single_caller])
    expected = session_now(single_caller, expected_id)
    server = start_split(repository, session_store=f"sqlite:{tmp_path}/state/sessions.db")
    try:
        callers = callers_on(server)
        session_id, _ = session_story([callers[role] for role in API_ROLES])  # every operation acknowledged
        streams = {role: Reader(caller("Generate", endless())) for role, caller in callers.items()}
        wait_for(lambda: all(stream.responses for stream in streams.values()), what="both streams to decode")
        before = process_roles(server)

        freeze(server)  # the engine process stays down until thaw()
        try:
            os.kill(before["engine"], signal.SIGKILL)
            for role, stream in streams.items():
                assert stream.finished.wait(60), f"the stream on {role} hangs with the engine process dead"
                assert stream.error.code() == grpc.StatusCode.UNAVAILABLE, (role, stream.error)
            for role, caller in callers.items():
                for service in ("", SERVICE, f"{SERVICE}/tiny-lm", f"{SERVICE}/tiny-g2p"):
                    wait_for(lambda c=caller, s=service: c.health(s) == NOT_SERVING, 60, f"{role} NOT_SERVING")
                codes = {rpc: caller.code(rpc, request) for rpc, request in outage_calls(session_id)}
                assert codes == dict.fromkeys(codes, "UNAVAILABLE"), role
                assert triton_outage(caller.channel) == {"ServerReady": False, "ModelReady": False,
                                                         "ModelMetadata": "UNAVAILABLE",
                                                         "RepositoryIndex": "UNAVAILABLE", "ModelInfer": "UNAVAILABLE"}
        finally:
            thaw(server)

        restarted(server, "engine", before["engine"])
        for role, caller in callers.items():
            wait_for(lambda c=caller: c.health() == SERVING, UP_SECONDS, f"{role} to serve again")
            assert caller.code("Generate", generate("a", max_new_tokens=3)) == "OK"
        assert process_roles(server)["api-0"] == before["api-0"] and process_roles(server)["api-1"] == before["api-1"]
        # Every operation acknowledged before the kill is in the store; nothing refused during the outage is.
        assert_same(session_now(callers["api-1"], session_id), expected, "the session after the engine's restart")
        assert_same(session_now(callers["api-0"], session_id), expected, "the session after the engine's restart")
    finally:
        shut(server)


# --- Triton sequences --------------------------------------------------------------------------------------------

def triton_client(server: ServeProcess) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(server.target, channel_args=[OWN_CONNECTION])


def triton_on(server: ServeProcess, roles, since: int = 0, tries: int = 64) -> tuple[tc.InferenceServerClient, str]:
    """A tritonclient on a new connection that reached one of `roles` (logging from index `since`)."""
    for _ in range(tries):
        client = triton_client(server)
        request_id = new_id()
        assert client.is_server_live(headers={REQUEST_ID_HEADER: request_id})
        role = served_by(server, [request_id], since)[request_id]
        if role in roles:
            return client, role
        client.close()
    raise AssertionError(f"{tries} new connections never reached {roles}")


def text_input(text: str) -> tc.InferInput:
    tensor = tc.InferInput("TEXT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return tensor


SEQUENCE = [("the cat ", 0), ("sat on", 8), (" a mat", 8), (" the dog", 6), (" ran", 5)]  # (text, new tokens)


def test_a_triton_sequence_reaches_its_session_from_every_api_process(repository, single_caller):
    native = single_caller
    created = native("CreateSession", pb.CreateSessionRequest(model="tiny-lm", prefix=SEQUENCE[0][0]))
    expected = [""]
    for text, new_tokens in SEQUENCE[1:]:
        native("Feed", pb.FeedRequest(session_id=created.session_id, text=text))
        done = list(native("GenerateInSession", pb.GenerateInSessionRequest(
            session_id=created.session_id, options=S(max_new_tokens=new_tokens))))[-1].done
        expected.append(done.text)
    assert all(expected[1:])

    server = start_split(repository)
    answers, served = [], []

    def infer(client: tc.InferenceServerClient, index: int, since: int = 0) -> None:
        text, new_tokens = SEQUENCE[index]
        request_id = new_id()
        result = client.infer("tiny-lm", [text_input(text)], sequence_id=4242, sequence_start=index == 0,
                              sequence_end=index == len(SEQUENCE) - 1, headers={REQUEST_ID_HEADER: request_id},
                              parameters={"max_new_tokens": new_tokens} if new_tokens else None)
        answers.append(result.as_numpy("TEXT")[0].decode())
        served.append(served_by(server, [request_id], since)[request_id])
        client.close()

    try:
        first, started_on = triton_on(server, API_ROLES)
        infer(first, 0)
        other = next(role for role in API_ROLES if role != started_on)
        infer(triton_on(server, [other])[0], 1)  # continued on another connection, another process

        # The process that started the sequence dies and is started again; the sequence goes on.
        old = process_roles(server)[started_on]
        os.kill(old, signal.SIGKILL)
        since = restarted(server, started_on, old)
        infer(triton_client(server), 2)
        infer(triton_on(server, [started_on], since)[0], 3, since)  # on the restarted process
        infer(triton_client(server), 4)  # sequence_end

        assert answers == expected
        assert served[:2] == [started_on, other] and served[3] == started_on
        client = triton_client(server)
        with pytest.raises(InferenceServerException) as ended:
            client.infer("tiny-lm", [text_input("more")], sequence_id=4242)
        client.close()
        assert ended.value.status() == "StatusCode.NOT_FOUND" and "4242" in ended.value.message()
    finally:
        shut(server)


# --- the client's retries ----------------------------------------------------------------------------------------

def chunk(ids: list[int], text: str, first: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=ids, tokens=[f"t{i}" for i in ids], text=text,
                                                   log_probs=[-0.5 - i for i in ids], first_token_index=first))


def given_out(given: _Given, responses) -> list:
    return [out for out in map(given.rest_of, responses) if out is not None]


def test_an_uncut_stream_is_given_out_whole():
    given = _Given()
    responses = [chunk([5, 6], "ab", 0), chunk([7], "c", 2), chunk([8], "", 3), chunk([9], "de", 4)]
    assert given_out(given, responses) == responses


def test_a_replayed_generation_gives_out_nothing_twice():
    given = _Given()
    # The first attempt gave out 3 tokens (the text of the third held back, as for a stop string), then was cut.
    out = given_out(given, [chunk([5, 6], "ab", 0), chunk([7], "", 2)])
    given.attempt()
    done = pb.GenerateResponse(done=pb.GenerationDone(text="abcde", generated_tokens=5))
    # The second replays the same generation, coalesced otherwise, and goes on.
    out += given_out(given, [chunk([5], "a", 0), chunk([6, 7, 8], "bcd", 1), chunk([9], "e", 4), done])
    chunks = [r.chunk for r in out if r.HasField("chunk")]
    assert [t for c in chunks for t in c.token_ids] == [5, 6, 7, 8, 9]
    assert "".join(c.text for c in chunks) == "abcde"
    assert [c.first_token_index for c in chunks] == [0, 2, 3, 4]
    assert [list(c.tokens) for c in chunks] == [["t5", "t6"], ["t7"], ["t8"], ["t9"]]
    assert [list(c.log_probs) for c in chunks] == [[-5.5, -6.5], [-7.5], [-8.5], [-9.5]]
    assert out[-1] == done


def test_a_replay_that_stops_short_gives_out_nothing():
    given = _Given()
    out = given_out(given, [chunk([5, 6, 7], "abc", 0)])
    given.attempt()
    out += given_out(given, [chunk([5, 6], "ab", 0)])
    given.attempt()
    out += given_out(given, [chunk([5, 6, 7, 8], "abcd", 0)])
    assert [list(r.chunk.token_ids) for r in out] == [[5, 6, 7], [8]] and [r.chunk.text for r in out] == ["abc", "d"]


@pytest.mark.parametrize("replay", [[chunk([5, 9], "ax", 0)], [chunk([5], "a", 0), chunk([6], "z", 1)]],
                         ids=["other tokens", "other text"])
def test_a_replay_that_comes_out_different_is_aborted(replay):
    given = _Given()
    given_out(given, [chunk([5, 6], "ab", 0)])
    given.attempt()
    with pytest.raises(ClientError) as caught:
        given_out(given, replay)
    assert caught.value.code == "ABORTED"


def test_the_clients_retries_wait_for_the_engine_process_and_apply_once(repository, tmp_path, single_caller,
                                                                        monkeypatch):
    # How long the client keeps retrying is its policy; on a loaded machine an engine process may take longer
    # than that to start, and this test is about what a retry does, not how soon the engine is back.
    monkeypatch.setattr(client_module, "RETRY_SECONDS", 600.0)
    reference_id = single_caller("CreateSession", pb.CreateSessionRequest(model="tiny-lm", prefix="the cat")).session_id
    expected_fed = single_caller("Feed", pb.FeedRequest(session_id=reference_id, text=" sat on"))
    reference_id = single_caller("CreateSession", pb.CreateSessionRequest(model="tiny-lm", prefix="a dog")).session_id
    expected_generated = collapsed(single_caller("GenerateInSession", pb.GenerateInSessionRequest(
        session_id=reference_id, options=S(max_new_tokens=8, min_new_tokens=8))))

    server = start_split(repository, session_store=f"sqlite:{tmp_path}/state/sessions.db")
    client = Client(server.target, timeout=CALL_SECONDS)
    try:
        caller = Caller(server.target)
        fed_id = caller("CreateSession", pb.CreateSessionRequest(model="tiny-lm", prefix="the cat")).session_id
        generated_id = caller("CreateSession", pb.CreateSessionRequest(model="tiny-lm", prefix="a dog")).session_id
        feed = pb.FeedRequest(session_id=fed_id, text=" sat on", request_id=new_id())
        request = pb.GenerateInSessionRequest(session_id=generated_id, request_id=new_id(),
                                              options=S(max_new_tokens=8, min_new_tokens=8))
        before = process_roles(server)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            freeze(server)
            try:
                os.kill(before["engine"], signal.SIGKILL)
                wait_for(lambda: caller.health() == NOT_SERVING, 60, "the engine process to be missed")
                fed = pool.submit(client.call_retried, "Feed", feed)
                generated = pool.submit(lambda: list(client.stream_retried("GenerateInSession", request)))
                # Both were sent and refused while the engine process was down, and are waiting to try again.
                wait_for(lambda: {feed.request_id, request.request_id} <= {
                    e["request_id"] for e in call_lines(server) if e["code"] == "UNAVAILABLE"}, 60,
                    "both calls to be refused", pause=0.05)
                assert not fed.done() and not generated.done()
            finally:
                thaw(server)
            fed, generated = fed.result(timeout=UP_SECONDS + 60), generated.result(timeout=UP_SECONDS + 60)
        assert process_roles(server)["engine"] != before["engine"]
        assert (fed.tokens_fed, fed.tokens_consumed) == (expected_fed.tokens_fed, expected_fed.tokens_consumed)
        assert_same(collapsed(generated), expected_generated, "the generation sent while the engine was down")
        # Applied once: the session holds the feed once, and sending it again replays its answer.
        assert client.call_retried("GetSession", pb.GetSessionRequest(session_id=fed_id)).tokens_consumed == (
            expected_fed.tokens_consumed)
        again = client.call_retried("Feed", feed)
        assert (again.tokens_fed, again.tokens_consumed) == (fed.tokens_fed, fed.tokens_consumed)
        assert caller("GetSession", pb.GetSessionRequest(session_id=fed_id)).tokens_consumed == fed.tokens_consumed
        assert caller("GetSession", pb.GetSessionRequest(session_id=generated_id)).tokens_consumed == (
            expected_generated[-1].done.session_tokens_consumed)
    finally:
        client.close()
        shut(server)


# --- SIGTERM -------------------------------------------------------------------------------------------------------

LONG_TOKENS = 1000  # with top log-probs, far more bytes than SLOW_LINK's window: the call ends when its client reads


def test_sigterm_drains_every_process_and_exits_zero(repository):
    server = start_split(repository, drain_grace_seconds=600)
    callers: dict[str, Caller] = {}
    try:
        callers = callers_on(server, options=SLOW_LINK)
        calls = {role: caller("Generate", generate("the", max_new_tokens=LONG_TOKENS, min_new_tokens=LONG_TOKENS,
                                                    return_log_probs=True, top_log_probs=5))
                 for role, caller in callers.items()}
        firsts = {role: next(call) for role, call in calls.items()}  # in flight on each API process
        before = process_roles(server)

        server.process.send_signal(signal.SIGTERM)
        # New connections until both API processes have refused a call. A call may still be answered by a
        # process that has not begun to drain (the signal reaches it through the supervisor), never by one
        # that has refused one already.
        refused: set[str] = set()
        for _ in range(200):
            caller = Caller(server.target)
            code = caller.code("Generate", generate("a", max_new_tokens=3))
            role = served_by(server, caller.ids)[caller.ids[0]]
            if code == "UNAVAILABLE":
                assert caller.health() == NOT_SERVING
                refused.add(role)
            else:
                assert code == "OK" and role not in refused, (code, role)
            caller.close()
            if refused == set(API_ROLES):
                break
        assert refused == set(API_ROLES)
        assert process_roles(server) == before  # every process is still there: the two calls are in flight

        for role, call in calls.items():
            responses = [firsts[role], *call]
            *chunks, last = responses
            assert sum(len(r.chunk.token_ids) for r in chunks) == last.done.generated_tokens == LONG_TOKENS, role
        assert server.process.wait(timeout=120) == 0
        events = server.events()
        for role in (*API_ROLES, None):  # None: the supervisor
            (stopped,) = [e for e in events if e.get("event") == "stopped" and e.get("process_role") == role]
            assert stopped["drained"] is True, role
        assert all(e.get("code") != "CANCELLED" for e in events if "rpc" in e)
    finally:
        for caller in callers.values():
            caller.close()
        server.kill()
