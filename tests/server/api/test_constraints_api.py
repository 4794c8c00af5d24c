"""Constraints through the wire: a real server on the repository's models (fortunes-lm, g2p-en), called over
gRPC (seqserve.v1, the Open Inference Protocol through tritonclient, sessions, the `seqserve client` flags).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seqserve.v1 import service_pb2 as pb
from server.app import ServerThread
from server.client import main
from server.config import ServerConfig

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[3] / "models"
S = pb.DecodingOptions
YES_NO = r"(yes|no|maybe)[.!]"


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(repository=str(REPOSITORY), port=0, metrics_port=0, poll_interval_seconds=0,
                          log_level="warning", constraint_max_chars=2000, constraint_compile_seconds=0.5)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def triton(server):
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


def constrained(**kind) -> pb.Constraint:
    if "choice" in kind:
        return pb.Constraint(choice=pb.ChoiceList(values=kind["choice"]))
    return pb.Constraint(**kind)


def generate(stub, prompt: str, **options) -> pb.GenerationDone:
    responses = list(stub.Generate(pb.GenerateRequest(model="fortunes-lm", prompt=prompt, options=S(**options))))
    return responses[-1].done


def metric(server, name: str, **labels) -> float:
    page = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics").read().decode()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value


# --- seqserve.v1 ------------------------------------------------------------------------------------------

def test_generate_follows_each_kind(stub):
    done = generate(stub, "Q: Are you sure?\nA: ", constraint=constrained(regex=YES_NO))
    assert re.fullmatch(YES_NO, done.text) and done.finish_reason == pb.FINISH_REASON_EOS
    done = generate(stub, "Answer: ", constraint=constrained(choice=["yes", "no", "ask me later"]))
    assert done.text in ("yes", "no", "ask me later")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    done = generate(stub, "", strategy=S.STRATEGY_SAMPLE, seed=3,
                    constraint=constrained(json_schema=json.dumps(schema)))
    assert json.loads(done.text)["n"] in range(1, 10)
    done = generate(stub, "", strategy=S.STRATEGY_SAMPLE, seed=4,
                    constraint=constrained(grammar='start: "(" /[a-z]{1,4}/ ")"'))
    assert re.fullmatch(r"\([a-z]{1,4}\)", done.text)


def test_streamed_chunks_add_up_to_the_constrained_text(stub):
    responses = list(stub.Generate(pb.GenerateRequest(
        model="fortunes-lm", prompt="It is ", options=S(strategy=S.STRATEGY_SAMPLE, seed=9, temperature=1.5,
                                                          constraint=constrained(regex=r"[a-z]+( [a-z]+){3}\.")))))
    chunks = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    assert chunks == responses[-1].done.text and re.fullmatch(r"[a-z]+( [a-z]+){3}\.", chunks)


def test_translate_n_best_are_the_lexicons_candidates(stub):
    candidates = ["K AE1 T", "K AA1 T", "K AH0 T"]
    response = stub.Translate(pb.TranslateRequest(model="g2p-en", sources=["cat"], options=S(
        strategy=S.STRATEGY_BEAM, beam_size=3, n_best=3, constraint=constrained(choice=candidates))))
    assert sorted(h.text for h in response.translations[0].hypotheses) == sorted(candidates)


@pytest.mark.parametrize("constraint, field, words", [
    (constrained(regex="(ab"), "options.constraint.regex", "unclosed group"),
    (constrained(json_schema='{"type": '), "options.constraint.json_schema", "not valid JSON"),
    (constrained(grammar="start: x"), "options.constraint.grammar", "unknown name"),
    (constrained(choice=["a", ""]), "options.constraint.choice.values[1]", "non-empty string"),
    (constrained(regex="x" * 2001), "options.constraint.regex", "at most 2000 characters"),
    (pb.Constraint(), "options.constraint", "one of regex, choice, json_schema, grammar"),
])
def test_bad_constraints_are_invalid_argument_naming_the_field(server, stub, constraint, field, words):
    before = metric(server, "seqserve_constrained_requests_total", model="fortunes-lm", kind="regex")
    error = refused(lambda: generate(stub, "x", constraint=constraint))
    details = error.details()
    assert details.startswith(field) and words in details, details
    assert len(details) <= len(field) + 40 + 200
    assert metric(server, "seqserve_constrained_requests_total", model="fortunes-lm", kind="regex") == before


def test_a_constraint_that_takes_too_long_to_compile_never_holds_up_the_others(stub):
    outcome = {}

    def pathological():
        started = time.monotonic()
        try:
            generate(stub, "x", constraint=constrained(regex="a{100000}"))
        except grpc.RpcError as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=pathological)
    worker.start()
    plain = generate(stub, "The ", max_new_tokens=5, min_new_tokens=5)
    worker.join()
    assert len(plain.text) == 5
    error = outcome["error"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("options.constraint.regex")


def test_constrained_requests_and_mask_time_are_metrics(server, stub):
    before = metric(server, "seqserve_constrained_requests_total", model="fortunes-lm", kind="choice")
    generate(stub, "", constraint=constrained(choice=["x", "y"]))
    assert metric(server, "seqserve_constrained_requests_total", model="fortunes-lm", kind="choice") == before + 1
    assert metric(server, "seqserve_constraint_mask_seconds_count", model="fortunes-lm") > 0


# --- sessions ---------------------------------------------------------------------------------------------

def test_a_session_generation_keeps_to_its_constraint_and_the_session_goes_on(stub):
    session = stub.CreateSession(pb.CreateSessionRequest(model="fortunes-lm", prefix="Q: Well?\nA: "))
    bad = refused(lambda: list(stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session.session_id, options=S(constraint=constrained(regex="(x"))))))
    assert bad.details().startswith("options.constraint.regex")
    same = stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    assert same.tokens_consumed == session.tokens_consumed
    responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session.session_id, options=S(constraint=constrained(regex=YES_NO)))))
    done = responses[-1].done
    assert re.fullmatch(YES_NO, done.text) and done.finish_reason == pb.FINISH_REASON_EOS
    stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" Why?\nA: "))
    responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session.session_id, options=S(max_new_tokens=5, min_new_tokens=5))))
    assert len(responses[-1].done.text) == 5  # the constraint held for that generation only
    stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))


# --- Open Inference Protocol ---------------------------------------------------------------------------------

def text_input(texts):
    tensor = tc.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def texts_of(result) -> list[str]:
    return [b.decode() for b in result.as_numpy("TEXT").reshape(-1)]


def test_infer_takes_the_constraint_as_parameters(triton):
    result = triton.infer("fortunes-lm", [text_input(["Q: Ready?\nA: "])], parameters={"regex": YES_NO})
    assert re.fullmatch(YES_NO, texts_of(result)[0])
    result = triton.infer("g2p-en", [text_input(["cat", "dog"])],
                          parameters={"choice": json.dumps(["K AE1 T", "D AO1 G"])})
    assert texts_of(result) == ["K AE1 T", "D AO1 G"]
    result = triton.infer("fortunes-lm", [text_input([""])],
                          parameters={"json_schema": '{"enum": ["red", "blue"]}', "strategy": "sample", "seed": 1})
    assert json.loads(texts_of(result)[0]) in ("red", "blue")
    result = triton.infer("fortunes-lm", [text_input([""])], parameters={"grammar": 'start: "a" | "b"'})
    assert texts_of(result)[0] in ("a", "b")


def test_a_sequence_generation_takes_a_constraint(triton):
    result = triton.infer("fortunes-lm", [text_input(["Q: Sure?\nA: "])], sequence_id=77, sequence_start=True,
                          sequence_end=True, parameters={"max_new_tokens": 10, "regex": YES_NO})
    assert re.fullmatch(YES_NO, texts_of(result)[0])


@pytest.mark.parametrize("model, parameters, field", [
    ("fortunes-lm", {"regex": "(ab"}, "parameters.regex"),
    ("fortunes-lm", {"regex": "a", "choice": '["a"]'}, "parameters."),
    ("g2p-en", {"choice": "yes"}, "parameters.choice"),
    ("g2p-en", {"choice": '["K AE1 T", ""]'}, "parameters.choice[1]"),
    ("fortunes-lm", {"json_schema": "{"}, "parameters.json_schema"),
])
def test_infer_refuses_bad_constraints_naming_the_parameter(triton, model, parameters, field):
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, [text_input(["cat"])], parameters=parameters)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert caught.value.message().startswith(field), caught.value.message()


# --- the client's flags ---------------------------------------------------------------------------------

def test_client_flags_send_each_kind(server, capsys, tmp_path):
    target = f"127.0.0.1:{server.port}"
    schema, grammar = tmp_path / "schema.json", tmp_path / "grammar.lark"
    schema.write_text('{"type": "boolean"}')
    grammar.write_text('start: "on" | "off"\n')
    runs = [(["--regex", YES_NO], lambda text: re.fullmatch(YES_NO, text)),
            (["--choice", "left", "--choice", "right"], lambda text: text in ("left", "right")),
            (["--json-schema", str(schema)], lambda text: text in ("true", "false")),
            (["--grammar", str(grammar)], lambda text: text in ("on", "off"))]
    for flags, check in runs:
        code = main(["--target", target, "generate", "--model", "fortunes-lm", *flags, "Q: Go?\nA: "])
        out, _ = capsys.readouterr()
        assert code == 0 and check(out.rstrip("\n")), (flags, out)
    code = main(["--target", target, "generate", "--model", "fortunes-lm", "--regex", "(", "x"])
    _, err = capsys.readouterr()
    assert code == 1 and "INVALID_ARGUMENT" in err and "options.constraint.regex" in err
