"""The Open Inference Protocol (KServe v2 / Triton gRPC) through the real `tritonclient.grpc`, against a real
server on the repository's models (g2p-en, fortunes-lm): every answer is compared with the native
seqserve.v1 API's answer to the same request on the same server.
"""

from __future__ import annotations

import queue
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as triton_pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as triton_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[3] / "models"
WORDS = ["hello", "world", "cat", "seqserve"]
S = pb.DecodingOptions
TOKEN = "s3cret"


def _config(**overrides) -> ServerConfig:
    return ServerConfig(repository=str(REPOSITORY), port=0, metrics_port=0, poll_interval_seconds=0,
                        log_level="warning", **overrides)


@pytest.fixture(scope="module")
def server():
    with ServerThread(_config()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    triton = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def native(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.SeqserveStub(channel)


def text_input(texts, shape=None, datatype="BYTES", name="TEXT"):
    tensor = tc.InferInput(name, shape or [len(texts)], datatype)
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(shape or [len(texts)]))
    return tensor


def strings(result, name="TEXT") -> list:
    return np.vectorize(lambda b: b.decode())(result.as_numpy(name)).tolist()


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- health and metadata ---------------------------------------------------------------------------------

def test_live_ready_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("g2p-en") and client.is_model_ready("fortunes-lm", "1")
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata()
    assert metadata.name == "seqserve"
    assert set(metadata.extensions) == {"model_configuration", "sequence", "parameters", "statistics"}


def test_model_metadata_lists_the_tensors(client):
    g2p = client.get_model_metadata("g2p-en")
    assert (g2p.name, list(g2p.versions), g2p.platform) == ("g2p-en", ["1"], "seqserve_seq2seq")
    assert [(t.name, t.datatype, list(t.shape)) for t in g2p.inputs] == [("TEXT", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in g2p.outputs] == [("TEXT", "BYTES", [-1, -1]),
                                                                          ("SCORE", "FP32", [-1, -1])]
    lm = client.get_model_metadata("fortunes-lm", as_json=True)
    assert lm["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["1"]}]


def test_model_config_declares_sequences_and_decoupled_streams_for_the_lm(client, server):
    lm = client.get_model_config("fortunes-lm").config
    assert lm.HasField("sequence_batching") and lm.model_transaction_policy.decoupled
    assert lm.sequence_batching.max_sequence_idle_microseconds == server.app.config.session_ttl_seconds * 10**6
    assert lm.max_batch_size == 0 and [(i.name, list(i.dims)) for i in lm.input] == [("TEXT", [1])]
    g2p = client.get_model_config("g2p-en").config
    assert g2p.HasField("dynamic_batching") and not g2p.model_transaction_policy.decoupled
    assert g2p.max_batch_size == server.app.config.max_sources
    assert [o.name for o in g2p.output] == ["TEXT", "SCORE"]
    assert g2p.parameters["kind"].string_value == "seq2seq"


# --- translation -----------------------------------------------------------------------------------------

def test_infer_batch_equals_native_translate_greedy(client, native):
    result = client.infer("g2p-en", [text_input(WORDS)])
    expected = native.Translate(pb.TranslateRequest(model="g2p-en", sources=WORDS))
    assert strings(result) == [t.hypotheses[0].text for t in expected.translations]
    np.testing.assert_allclose(result.as_numpy("SCORE"), [t.hypotheses[0].score for t in expected.translations],
                               rtol=1e-6)
    assert result.as_numpy("SCORE").dtype == np.float32 and result.get_response().model_version == "1"


def test_infer_beam_n_best_equals_native_translate(client, native):
    parameters = {"strategy": "beam", "beam_size": 5, "n_best": 3, "length_penalty": 0.6}
    result = client.infer("g2p-en", [text_input(WORDS)], parameters=parameters)
    expected = native.Translate(pb.TranslateRequest(model="g2p-en", sources=WORDS, options=S(
        strategy=S.STRATEGY_BEAM, beam_size=5, n_best=3, length_penalty=0.6)))
    assert result.as_numpy("TEXT").shape == (len(WORDS), 3)
    assert strings(result) == [[h.text for h in t.hypotheses] for t in expected.translations]
    np.testing.assert_allclose(result.as_numpy("SCORE"), [[h.score for h in t.hypotheses]
                                                          for t in expected.translations], rtol=1e-6)


def test_batched_shape_and_requested_outputs(client, native):
    result = client.infer("g2p-en", [text_input(WORDS[:2], shape=[2, 1])], outputs=[tc.InferRequestedOutput("TEXT")])
    assert result.as_numpy("TEXT").shape == (2, 1) and result.as_numpy("SCORE") is None
    expected = native.Translate(pb.TranslateRequest(model="g2p-en", sources=WORDS[:2]))
    assert strings(result) == [[t.hypotheses[0].text] for t in expected.translations]


def test_bytes_contents_are_accepted_as_well_as_raw_contents(server, native):
    request = triton_pb.ModelInferRequest(model_name="g2p-en")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"hello", b"cat"])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert [o.name for o in response.outputs] == ["TEXT", "SCORE"]
    texts = _decode_bytes(response.raw_output_contents[0])
    expected = native.Translate(pb.TranslateRequest(model="g2p-en", sources=["hello", "cat"]))
    assert texts == [t.hypotheses[0].text for t in expected.translations]


def _decode_bytes(raw: bytes) -> list[str]:
    items, position = [], 0
    while position < len(raw):
        length = int.from_bytes(raw[position:position + 4], "little")
        items.append(raw[position + 4:position + 4 + length].decode())
        position += 4 + length
    return items


# --- generation ------------------------------------------------------------------------------------------

def _native_generate(native, prompt, **options) -> str:
    responses = list(native.Generate(pb.GenerateRequest(model="fortunes-lm", prompt=prompt, options=S(**options))))
    return responses[-1].done.text


def test_infer_on_the_lm_returns_the_whole_generation(client, native):
    result = client.infer("fortunes-lm", [text_input(["The meaning of life"])], parameters={"max_new_tokens": 40})
    assert strings(result) == [_native_generate(native, "The meaning of life", max_new_tokens=40)]
    parameters = result.get_response().parameters
    assert parameters["generated_tokens"].int64_param == 40 and parameters["finish_reason"].string_param == "length"


class Stream:
    """tritonclient's streaming callback, collected."""

    def __init__(self):
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error):
        self.items.put((result, error))

    def until_final(self, count: int = 1) -> list:
        """Results and errors until `count` requests got their final response (or an error)."""
        got, ended = [], 0
        while ended < count:
            result, error = self.items.get(timeout=120)
            got.append((result, error))
            if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
                ended += 1
        return got


def test_stream_assembles_the_text_of_native_generate(server, native):
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    stream = Stream()
    client.start_stream(callback=stream)
    try:
        parameters = {"max_new_tokens": 60, "strategy": "sample", "seed": 7, "top_k": 20}
        client.async_stream_infer("fortunes-lm", [text_input(["Life is"])], request_id="r1", parameters=parameters)
        got = stream.until_final()
    finally:
        client.stop_stream()
        client.close()
    assert all(error is None for _, error in got)
    assert len(got) > 2  # chunks, not one answer
    flags = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got]
    assert flags == [False] * (len(got) - 1) + [True]
    assert {r.get_response().id for r, _ in got} == {"r1"}
    text = "".join(strings(r)[0] for r, _ in got)
    assert text == _native_generate(native, "Life is", max_new_tokens=60, strategy=S.STRATEGY_SAMPLE, seed=7, top_k=20)


def test_stream_errors_arrive_on_the_stream_which_goes_on(server):
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    stream = Stream()
    client.start_stream(callback=stream)
    try:
        client.async_stream_infer("fortunes-lm", [text_input(["x"])], parameters={"top_k": -1})
        client.async_stream_infer("fortunes-lm", [text_input(["x"])], parameters={"max_new_tokens": 3})
        got = stream.until_final(2)
    finally:
        client.stop_stream()
        client.close()
    errors = [str(error) for _, error in got if error is not None]
    assert len(errors) == 1 and errors[0].startswith("[StatusCode.INVALID_ARGUMENT] parameters.top_k")
    assert any(error is None for _, error in got)


# --- sequences = sessions ------------------------------------------------------------------------------

def test_a_three_request_sequence_equals_the_native_session(client, native):
    steps = [("The cat ", 0), ("sat on the", 12), (" mat, and", 15)]
    answers = []
    for index, (text, new_tokens) in enumerate(steps):
        result = client.infer("fortunes-lm", [text_input([text])], sequence_id=4242, sequence_start=index == 0,
                              sequence_end=index == len(steps) - 1,
                              parameters={"max_new_tokens": new_tokens} if new_tokens else None)
        answers.append(strings(result)[0])

    session = native.CreateSession(pb.CreateSessionRequest(model="fortunes-lm", prefix=steps[0][0]))
    expected = [""]
    for text, new_tokens in steps[1:]:
        native.Feed(pb.FeedRequest(session_id=session.session_id, text=text))
        responses = list(native.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=session.session_id, options=S(max_new_tokens=new_tokens))))
        expected.append(responses[-1].done.text)
    native.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
    assert answers == expected and all(expected[1:])

    # sequence_end closed it: the id is unknown now.
    error = error_of(lambda: client.infer("fortunes-lm", [text_input(["more"])], sequence_id=4242))
    assert error.status() == "StatusCode.NOT_FOUND" and "4242" in error.message()


def test_sequences_with_string_ids_stream_their_generation(server):
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    stream = Stream()
    client.start_stream(callback=stream)
    try:
        client.async_stream_infer("fortunes-lm", [text_input(["Once upon"])], sequence_id="story-1",
                                  sequence_start=True)
        client.async_stream_infer("fortunes-lm", [text_input([" a time"])], sequence_id="story-1",
                                  parameters={"max_new_tokens": 20})
        client.async_stream_infer("fortunes-lm", [text_input([""])], sequence_id="story-1", sequence_end=True,
                                  parameters={"max_new_tokens": 5})
        got = stream.until_final(3)
    finally:
        client.stop_stream()
        client.close()
    assert all(error is None for _, error in got)
    finals = [r for r, _ in got if r.get_response().parameters["triton_final_response"].bool_param]
    assert len(finals) == 3
    generated = "".join(strings(r)[0] for r, _ in got)
    assert len(generated) > 0


def test_sequence_misuse_is_refused_with_the_right_codes(client, server):
    error = error_of(lambda: client.infer("fortunes-lm", [text_input(["hi"])], sequence_id=777))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "sequence_id 777" in error.message() and "sequence_start" in error.message()

    error = error_of(lambda: client.infer("g2p-en", [text_input(["hi"])], sequence_id=5, sequence_start=True))
    assert error.status() == "StatusCode.FAILED_PRECONDITION" and "language model" in error.message()

    request = triton_pb.ModelInferRequest(model_name="fortunes-lm")
    request.parameters["sequence_start"].bool_param = True
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as caught:
        triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.sequence_start needs a parameters.sequence_id" in caught.value.details()


def test_an_evicted_sequence_says_it_ended():
    # One session at most: starting a second sequence evicts the first, idle one.
    with ServerThread(_config(max_sessions=1, auth_token=TOKEN)) as running:
        client = tc.InferenceServerClient(f"127.0.0.1:{running.port}")
        headers = {"authorization": f"Bearer {TOKEN}"}
        client.infer("fortunes-lm", [text_input(["a"])], sequence_id=1, sequence_start=True, headers=headers)
        client.infer("fortunes-lm", [text_input(["b"])], sequence_id=2, sequence_start=True, headers=headers)
        error = error_of(lambda: client.infer("fortunes-lm", [text_input(["c"])], sequence_id=1, headers=headers))
        assert error.status() == "StatusCode.NOT_FOUND"
        assert "sequence_id 1" in error.message() and "has ended" in error.message() and "evicted" in error.message()

        # Auth applies to this protocol as to the native one.
        error = error_of(lambda: client.infer("fortunes-lm", [text_input(["c"])]))
        assert error.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_server_live(headers=headers)
        client.close()


# --- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "inputs", "parameters", "code", "words"), [
    ("no-such-model", [("TEXT", ["x"], "BYTES")], None, "NOT_FOUND", "unknown model 'no-such-model'"),
    ("g2p-en", [("TEXT", ["x"], "BYTES")], {"top_p": 1.5, "strategy": "sample"}, "INVALID_ARGUMENT",
     "parameters.top_p must be in (0, 1], got 1.5"),
    ("g2p-en", [("TEXT", ["x"], "BYTES")], {"strategy": "nucleus"}, "INVALID_ARGUMENT", "parameters.strategy"),
    ("g2p-en", [("TEXT", ["x"], "BYTES")], {"max_tokens": 3}, "INVALID_ARGUMENT", "parameters.max_tokens"),
    ("g2p-en", [("TEXT", ["x"], "BYTES")], {"top_k": "many"}, "INVALID_ARGUMENT", "top_k must be an integer"),
    ("g2p-en", [("WORDS", ["x"], "BYTES")], None, "INVALID_ARGUMENT", "inputs[0].name"),
    ("g2p-en", [("TEXT", [1], "INT32")], None, "INVALID_ARGUMENT", "inputs[0].datatype of TEXT must be BYTES"),
    ("g2p-en", [("TEXT", [""], "BYTES")], None, "INVALID_ARGUMENT", "TEXT[0]"),
    ("fortunes-lm", [("TEXT", ["a", "b"], "BYTES")], None, "INVALID_ARGUMENT", "inputs[0].shape"),
    ("fortunes-lm", [("TEXT", ["a"], "BYTES"), ("TEXT", ["b"], "BYTES")], None, "INVALID_ARGUMENT",
     "inputs must hold one tensor"),
])
def test_bad_requests_get_the_native_codes_and_messages(client, model, inputs, parameters, code, words):
    tensors = []
    for name, values, datatype in inputs:
        tensor = tc.InferInput(name, [len(values)], datatype)
        tensor.set_data_from_numpy(np.array(values, dtype=np.int32 if datatype == "INT32" else object)
                                   if datatype == "INT32" else np.array([v.encode() for v in values], dtype=object))
        tensors.append(tensor)
    error = error_of(lambda: client.infer(model, tensors, parameters=parameters))
    assert error.status() == f"StatusCode.{code}"
    assert words in error.message()


def test_a_bad_shape_and_an_unknown_output_name_the_field(client):
    error = error_of(lambda: client.infer("g2p-en", [text_input(["a", "b"], shape=[1, 2])]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "inputs[0].shape" in error.message()
    error = error_of(lambda: client.infer("g2p-en", [text_input(["a"])], outputs=[tc.InferRequestedOutput("PROBS")]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "outputs[0].name" in error.message()
    error = error_of(lambda: client.infer("fortunes-lm", [text_input(["a"])], model_version="x"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "model_version" in error.message()


def test_methods_outside_the_subset_are_unimplemented(client):
    error = error_of(lambda: client.load_model("g2p-en"))
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    error = error_of(lambda: client.get_system_shared_memory_status())
    assert error.status() == "StatusCode.UNIMPLEMENTED"


# --- statistics, index, metrics --------------------------------------------------------------------------

def test_statistics_index_and_prometheus_count_these_calls(client, server):
    before = client.get_inference_statistics("g2p-en").model_stats[0]
    client.infer("g2p-en", [text_input(WORDS[:3])])
    after = client.get_inference_statistics("g2p-en").model_stats[0]
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.queue.count == before.inference_stats.queue.count + 1  # perf_analyzer reads it
    assert after.last_inference > 0 and after.inference_stats.success.ns > before.inference_stats.success.ns

    index = client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} == {("g2p-en", "1", "READY"),
                                                                    ("fortunes-lm", "1", "READY")}

    error_of(lambda: client.infer("no-such-model", [text_input(["x"])]))
    page = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics").read().decode()
    counts = {(s.labels["rpc"], s.labels["model"], s.labels["code"]): s.value
              for family in text_string_to_metric_families(page) if family.name == "seqserve_requests"
              for s in family.samples if s.name == "seqserve_requests_total"}
    assert counts[("ModelInfer", "g2p-en", "OK")] >= 1
    assert counts[("ModelInfer", "", "NOT_FOUND")] >= 1  # a made-up model name is no label value
    assert counts[("ServerLive", "", "OK")] >= 1


def test_the_priority_parameter_is_a_triton_level_mapped_onto_seqserve_priorities(client, server):
    """Triton's convention: 0 = the default, 1 = the highest level, 2 the next, ...: here level 1 is
    max_priority (10), each level after it one lower, down to min_priority (-10) at level 21."""
    def waited(priority: int) -> float:
        return server.app.metrics.registry.get_sample_value(
            "seqserve_queue_wait_seconds_count", {"model": "fortunes-lm", "priority": str(priority)}) or 0.0

    before = {p: waited(p) for p in (10, 9, 0, -10)}
    for level in (1, 2, 0, 21):
        client.infer("fortunes-lm", [text_input(["a"])], parameters={"max_new_tokens": 2}, priority=level)
    assert {p: waited(p) - before[p] for p in before} == {10: 1, 9: 1, 0: 1, -10: 1}
    error = error_of(lambda: client.infer("fortunes-lm", [text_input(["a"])], priority=22))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == ("parameters.priority must be 0 (the default) or a level from 1 (the highest, "
                               "priority 10) to 21 (the lowest, priority -10), got 22")
