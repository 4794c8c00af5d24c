"""A real server (127.0.0.1, port 0) on tiny trained bundles, called over gRPC: every RPC, every decoding
option against the PyTorch reference decoders on the checkpoint's model, concurrency, stop strings,
coalescing and cancellation. Nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.bundle import read_manifest
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from seqserve.v1.manifest_pb2 import ModelKind
from server.app import ServerThread
from server.config import ServerConfig
from training.batching import BOS, EOS, make_pair_batch
from training.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint, tokenizers_from_checkpoint
from training.models.decoding import beam_search, greedy_decode, sample_decode

SMALL_EXPORT = ExportOptions(eval_limit=20, real_inputs=100,
                             parity=ParitySettings(greedy_inputs=20, beam_inputs=6, max_new_tokens=20))
S = pb.DecodingOptions
STRATEGIES = {"greedy": S.STRATEGY_GREEDY, "sample": S.STRATEGY_SAMPLE, "beam": S.STRATEGY_BEAM}
PROMPTS = ["the cat", "a big dog", ""]
SOURCES = ["abc", "hedge", "gag", "fade"]
ENDLESS_TOKENS = 1_000_000  # no machine reaches it before the test ends the generation


@pytest.fixture(scope="module")
def torch_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tiny_runs, torch_one_thread):
    return {"lm": tiny_runs["lstm", "lm"], "seq2seq": tiny_runs["gru", "seq2seq"]}


@pytest.fixture(scope="module")
def repository(runs, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    export_run(runs["lm"], repository, "tiny-lm", options=SMALL_EXPORT)
    export_run(runs["seq2seq"], repository, "tiny-g2p", options=SMALL_EXPORT)
    return repository


@pytest.fixture(scope="module")
def server(repository):
    config = ServerConfig(repository=str(repository), port=0, metrics_port=0, poll_interval_seconds=0,
                          max_new_tokens=ENDLESS_TOKENS, log_level="warning")
    with ServerThread(config) as running:
        yield running


class Reference:
    """The training side's decoders on the checkpoints the bundles were exported from."""

    def __init__(self, runs):
        self.lm, lm_tokenizers = _load(runs["lm"])
        self.seq2seq, s2s_tokenizers = _load(runs["seq2seq"])
        self.text, self.source = lm_tokenizers["text"], s2s_tokenizers["source"]

    @torch.no_grad()
    def generate(self, prompt: str, **options) -> list:
        ids = [BOS, *(self.text.encode(prompt).ids if prompt else [])]
        start, state = self.lm.prefill([ids])
        return _decode(self.lm.step_fn(), state, start, options, prompt_tokens=[ids])

    @torch.no_grad()
    def translate(self, source: str, **options) -> list:
        batch = make_pair_batch([(self.source.encode(source).ids, [])])
        start, state = self.seq2seq.start(batch.src, batch.src_lengths, BOS)
        return _decode(self.seq2seq.step_fn(), state, start, options, prompt_tokens=None)


def _load(run):
    payload = load_checkpoint(find_checkpoint(run))
    return model_from_checkpoint(payload), tokenizers_from_checkpoint(payload)


def _decode(step, state, start, options: dict, prompt_tokens) -> list:
    """The reference hypotheses (n-best list, or one) for server-style options with the server's defaults."""
    common = dict(eos_id=EOS, max_new_tokens=options.get("max_new_tokens", 64),
                  min_new_tokens=options.get("min_new_tokens", 0),
                  no_repeat_ngram_size=options.get("no_repeat_ngram_size", 0),
                  repetition_penalty=options.get("repetition_penalty", 1.0), prompt_tokens=prompt_tokens)
    strategy = options.get("strategy", "greedy")
    if strategy == "greedy":
        return greedy_decode(step, state, start, **common)
    if strategy == "sample":
        return sample_decode(step, state, start, seed=options["seed"], temperature=options.get("temperature", 1.0),
                             top_k=options.get("top_k", 0), top_p=options.get("top_p", 1.0), **common)
    return beam_search(step, state, start, beam_size=options.get("beam_size", 4),
                       length_penalty=options.get("length_penalty", 1.0), n_best=options.get("n_best", 1),
                       early_stopping=options.get("early_stopping", False), **common)[0]


@pytest.fixture(scope="module")
def reference(runs):
    return Reference(runs)


def options_pb(**options) -> pb.DecodingOptions:
    message = S(**{k: v for k, v in options.items() if k != "strategy"})
    message.strategy = STRATEGIES[options.get("strategy", "greedy")]
    return message


def generate(stub, prompt, **options):
    """(chunks, done) of one Generate stream."""
    responses = list(stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt=prompt, options=options_pb(**options))))
    return [r.chunk for r in responses[:-1]], responses[-1].done


def streamed_ids(chunks) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


# --- models, health, reflection ----------------------------------------------------------------------------

def test_list_and_get_model(stub, repository):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"tiny-lm", "tiny-g2p"}
    assert models["tiny-lm"].kind == ModelKind.MODEL_KIND_LM and models["tiny-g2p"].kind == ModelKind.MODEL_KIND_SEQ2SEQ
    assert list(models["tiny-lm"].versions) == [1] and models["tiny-lm"].latest_version == 1 and models["tiny-lm"].ready

    info = stub.GetModel(pb.GetModelRequest(model="tiny-g2p"))
    assert info.manifest == read_manifest(repository / "tiny-g2p" / "1" / "manifest.json")
    assert (info.name, info.version, info.variant, info.ready) == ("tiny-g2p", 1, "fp32", True)
    assert list(info.providers) == ["CPUExecutionProvider"] == list(info.requested_providers)
    assert stub.GetModel(pb.GetModelRequest(model="tiny-g2p", version=1)) == info


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "seqserve.v1.Seqserve", "seqserve.v1.Seqserve/tiny-lm", "seqserve.v1.Seqserve/tiny-g2p"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="seqserve.v1.Seqserve/nope"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {service.name for service in answer.list_services_response.service}
        assert {"seqserve.v1.Seqserve", "grpc.health.v1.Health"} <= names


# --- the reference decoders, token for token ----------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"strategy": "beam", "beam_size": 4, "n_best": 3, "length_penalty": 0.6}])
def test_translate_equals_the_reference(stub, reference, options):
    response = stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=SOURCES, options=options_pb(**options)))
    assert (response.model, response.version, len(response.translations)) == ("tiny-g2p", 1, len(SOURCES))
    for source, translation in zip(SOURCES, response.translations, strict=True):
        expected = reference.translate(source, **options)
        assert [list(h.token_ids) for h in translation.hypotheses] == [h.tokens for h in expected]
        assert [h.score for h in translation.hypotheses] == pytest.approx([h.score for h in expected], abs=1e-3)
        assert [pb.FinishReason.Name(h.finish_reason) for h in translation.hypotheses] == [
            f"FINISH_REASON_{h.finish_reason.upper()}" for h in expected]
        assert all(h.text == " ".join(h.tokens) for h in translation.hypotheses)  # word-level phonemes


def test_translate_stream_equals_translate(stub, reference):
    for source in SOURCES[:2]:
        responses = list(stub.TranslateStream(pb.TranslateStreamRequest(
            model="tiny-g2p", source=source, options=S(return_log_probs=True), return_attention=True)))
        chunks, done = [r.chunk for r in responses[:-1]], responses[-1].done
        (best,) = done.translation.hypotheses
        assert streamed_ids(chunks) == list(best.token_ids) == reference.translate(source)[0].tokens
        assert "".join(c.text for c in chunks) == best.text
        assert [c.first_token_index for c in chunks] == [sum(len(c.token_ids) for c in chunks[:i])
                                                         for i in range(len(chunks))]
        assert done.finish_reason == best.finish_reason == pb.FINISH_REASON_EOS
        assert len(best.token_log_probs) == len(best.token_ids) and len(best.attention) == len(best.token_ids)
        assert list(done.translation.source_tokens) == list(source)
        assert all(sum(row.weights) == pytest.approx(1, abs=1e-4) for row in best.attention)


# Each set changes the reference's output for some prompt (checked), so the server can only match it if
# the option reached the engine.
GENERATE_OPTIONS = [
    {"max_new_tokens": 5},
    {"min_new_tokens": 40, "max_new_tokens": 45},
    {"repetition_penalty": 1.8},
    {"no_repeat_ngram_size": 2},
    {"strategy": "sample", "seed": 7, "temperature": 0.8, "top_k": 6, "top_p": 0.9},
    {"strategy": "sample", "seed": 2**63 + 5, "temperature": 1.5},
    {"strategy": "beam", "beam_size": 3, "length_penalty": 0.2},
    {"strategy": "beam", "beam_size": 5, "early_stopping": True, "max_new_tokens": 12},
]


@pytest.mark.parametrize("options", GENERATE_OPTIONS, ids=lambda o: ",".join(o))
def test_every_generate_option_reaches_the_engine(stub, reference, options):
    changed = False
    for prompt in PROMPTS:
        (expected,) = reference.generate(prompt, **options)[:1]
        changed |= expected.tokens != reference.generate(prompt)[0].tokens
        chunks, done = generate(stub, prompt, **options)
        assert streamed_ids(chunks) == expected.tokens
        assert done.generated_tokens == len(expected.tokens)
        assert done.finish_reason == getattr(pb, f"FINISH_REASON_{expected.finish_reason.upper()}")
        assert done.log_prob == pytest.approx(expected.log_prob, abs=1e-3)
        assert done.text == "".join(c.text for c in chunks) and (done.model, done.version) == ("tiny-lm", 1)
    assert changed, f"{options} changes nothing for these prompts; the test would prove nothing"


@pytest.mark.parametrize("options", [{"strategy": "beam", "beam_size": 5, "n_best": 3, "early_stopping": True},
                                     {"strategy": "sample", "seed": 3, "top_p": 0.8},
                                     {"no_repeat_ngram_size": 1, "min_new_tokens": 3}])
def test_every_translate_option_reaches_the_engine(stub, reference, options):
    response = stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=SOURCES, options=options_pb(**options)))
    for source, translation in zip(SOURCES, response.translations, strict=True):
        assert [list(h.token_ids) for h in translation.hypotheses] == [
            h.tokens for h in reference.translate(source, **options)]


def test_log_probs_and_alternatives(stub):
    chunks, done = generate(stub, "the", max_new_tokens=10, min_new_tokens=10, return_log_probs=True,
                            top_log_probs=3)
    log_probs = [p for c in chunks for p in c.log_probs]
    alternatives = [a for c in chunks for a in c.top_log_probs]
    assert len(log_probs) == len(alternatives) == done.generated_tokens == 10
    assert sum(log_probs) == pytest.approx(done.log_prob, abs=1e-4)  # LENGTH: no <eos> term
    for token, log_prob, top in zip(streamed_ids(chunks), log_probs, alternatives, strict=True):
        assert len(top.candidates) == 3 and top.candidates[0].token_id == token  # greedy takes the best
        assert top.candidates[0].log_prob == pytest.approx(log_prob)


# --- concurrency ------------------------------------------------------------------------------------------

def _mixed(index: int) -> tuple[str, str, dict]:
    """The index-th request of a crowd: (rpc, text, options), cycling kinds and strategies."""
    strategy = ("greedy", "beam", "sample")[index % 3]
    options = {"strategy": strategy, "max_new_tokens": 16}
    if strategy == "sample":
        options.update(seed=1000 + index, temperature=0.9)
    if strategy == "beam":
        options.update(beam_size=2 + index % 3)
    if index % 2:
        return "Generate", PROMPTS[index % len(PROMPTS)], options
    return "TranslateStream", SOURCES[index % len(SOURCES)], options


async def _stream(stub, rpc: str, text: str, options: dict) -> list[int]:
    if rpc == "Generate":
        request = pb.GenerateRequest(model="tiny-lm", prompt=text, options=options_pb(**options))
    else:
        request = pb.TranslateStreamRequest(model="tiny-g2p", source=text, options=options_pb(**options))
    responses = [r async for r in getattr(stub, rpc)(request)]
    if rpc == "TranslateStream" and options["strategy"] == "beam":
        assert len(responses) == 1  # beams stream no chunks: the n-best list comes with .done
        return list(responses[0].done.translation.hypotheses[0].token_ids)
    return streamed_ids(r.chunk for r in responses[:-1])


def _crowd(port: int, requests: list[tuple[str, str, dict]]) -> list[list[int]]:
    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SeqserveStub(channel)
            return await asyncio.gather(*(_stream(stub, *request) for request in requests))

    return asyncio.run(main())


def _expected(reference, rpc: str, text: str, options: dict) -> list[int]:
    decode = reference.generate if rpc == "Generate" else reference.translate
    return decode(text, **options)[0].tokens


def test_64_concurrent_mixed_streams_are_all_correct(server, reference):
    requests = [_mixed(i) for i in range(64)]
    results = _crowd(server.port, requests)
    assert results == [_expected(reference, *request) for request in requests]


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(server, reference):
    seeded = ("Generate", "the", {"strategy": "sample", "seed": 12345, "temperature": 1.2, "max_new_tokens": 30})
    (alone,) = _crowd(server.port, [seeded])
    crowd = _crowd(server.port, [_mixed(i) for i in range(16)] + [seeded] + [_mixed(i) for i in range(16, 32)])
    assert crowd[16] == alone == _expected(reference, *seeded)


def test_the_seed_a_sampling_request_used_is_reported_and_replays_it(stub):
    chunks, done = generate(stub, "the", strategy="sample", temperature=1.5, max_new_tokens=24)
    assert done.HasField("seed")  # drawn by the server: the request gave none
    again_chunks, again = generate(stub, "the", strategy="sample", temperature=1.5, max_new_tokens=24, seed=done.seed)
    assert again.seed == done.seed and streamed_ids(again_chunks) == streamed_ids(chunks) and again.text == done.text
    assert not generate(stub, "the", max_new_tokens=4)[1].HasField("seed")  # greedy draws nothing


# --- stop strings, coalescing, cancellation ------------------------------------------------------------------

@pytest.mark.parametrize("strategy", [{}, {"strategy": "sample", "seed": 5}], ids=["greedy", "sample"])
def test_stop_strings_never_leak(stub, strategy):
    common = dict(max_new_tokens=40, min_new_tokens=40, **strategy)
    text = generate(stub, "the", **common)[1].text
    for stops in ([text[12:15]], [text[20:23], text[8:10]], [text[30:], "never there"]):
        # The text ends before whichever stop string appears first.
        end = min(text.find(s) for s in stops if s in text)
        chunks, done = generate(stub, "the", stop=stops, **common)
        streamed = "".join(c.text for c in chunks)
        assert streamed == done.text == text[:end]
        assert done.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE and text[end:].startswith(done.matched_stop)
        assert done.matched_stop in stops and not any(s in streamed for s in stops)


def test_a_slow_reader_gets_coalesced_chunks(server):
    # A small HTTP/2 window stands for a slow link: once it is full the server's writes wait, and the
    # tokens decoded meanwhile must go out together rather than queue up one message each.
    slow_link = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=slow_link) as channel:
        call = pb_grpc.SeqserveStub(channel).Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=S(
            max_new_tokens=800, min_new_tokens=800, return_log_probs=True, top_log_probs=5)))
        first = next(call)
        time.sleep(1.0)  # the reader falls behind
        rest = list(call)
    chunks, done = [first.chunk] + [r.chunk for r in rest[:-1]], rest[-1].done
    assert done.generated_tokens == len(streamed_ids(chunks)) == 800
    assert max(len(c.token_ids) for c in chunks) > 1 and len(chunks) < 800
    assert all(len(c.token_ids) == len(c.tokens) == len(c.log_probs) == len(c.top_log_probs) for c in chunks)
    assert [c.first_token_index for c in chunks] == [sum(len(c.token_ids) for c in chunks[:i])
                                                     for i in range(len(chunks))]
    assert "".join(c.text for c in chunks) == done.text


def _active_rows(server) -> float:
    """Rows in use on every model, from the engines' gauges (set on their worker threads; one per model name)."""
    registry = server.app.metrics.registry
    return sum(registry.get_sample_value("seqserve_active_rows", {"model": name})
               for name in {engine.name for engine in server.app.registry.engines()})


def _metric(server, name: str, **labels: str) -> float:
    """A sample's value on /metrics (0 if absent: a labelled counter appears at its first increment)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_cancelled_streams_free_their_rows(server, stub):
    before = _metric(server, "seqserve_finished_total", model="tiny-lm", reason="cancelled")
    # Endless: only the cancellations below end them, however fast the machine.
    calls = [stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=options_pb(
        max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS, **extra)))
        for extra in ({}, {"strategy": "sample", "seed": 1})]
    beam = stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="a", options=options_pb(
        strategy="beam", beam_size=4, max_new_tokens=100_000, min_new_tokens=100_000)))
    for call in calls:
        next(call)  # decoding
    deadline = time.monotonic() + 10
    while _active_rows(server) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _active_rows(server) == 6  # 1 + 1 + 4 beams
    for call in (*calls, beam):
        call.cancel()
    while _active_rows(server) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _active_rows(server) == 0
    assert _metric(server, "seqserve_active_rows", model="tiny-lm") == 0
    assert _metric(server, "seqserve_finished_total", model="tiny-lm", reason="cancelled") == before + 3


def test_requests_are_counted_by_rpc_and_code(server, stub):
    stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=["ab"]))
    with pytest.raises(grpc.RpcError):
        stub.Translate(pb.TranslateRequest(model="made-up", sources=["ab"]))
    assert _metric(server, "seqserve_requests_total", model="tiny-g2p", rpc="Translate", code="OK") >= 1
    # A name the repository does not have is not a label value: clients cannot grow the metric.
    assert _metric(server, "seqserve_requests_total", model="", rpc="Translate", code="NOT_FOUND") >= 1
    assert _metric(server, "seqserve_time_to_first_token_seconds_count", model="tiny-lm") >= 1
    assert _metric(server, "seqserve_inter_token_latency_seconds_count", model="tiny-lm") >= 1
