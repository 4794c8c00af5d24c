"""The engine's output equals the PyTorch reference decoders (`training.models.decoding`) token for token,
on tiny trained LM and seq2seq bundles, whatever else shares the batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from server.bundle import load_bundle
from server.decoding import DecodingParams
from server.engine import EngineConfig, GenerationRequest, ModelEngine, TranslationRequest
from server.metrics import Metrics
from training.batching import make_pair_batch
from training.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from training.models.decoding import beam_search, greedy_decode, sample_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOS, EOS = 1, 2
SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))
ONE_THREAD = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
WORDS = "the a cat dog sat ran on under mat log big small red blue".split()


@pytest.fixture(scope="module")
def tiny(tiny_runs, tmp_path_factory):
    """kind -> (PyTorch model, bundle directory) for the tiny LSTM runs."""
    repository = tmp_path_factory.mktemp("engine-reference")
    out = {}
    for kind in ("lm", "seq2seq"):
        run = tiny_runs["lstm", kind]
        model = model_from_checkpoint(load_checkpoint(find_checkpoint(run)))
        out[kind] = (model, export_run(run, repository, f"tiny-{kind}", options=SMALL_EXPORT).path)
    return out


def run_engine(bundle_dir, requests, config=None):
    """Submit every request at once to a fresh engine; return their finish events in order."""

    async def go():
        bundle = load_bundle(bundle_dir, session_options=ONE_THREAD)
        registry = CollectorRegistry()
        engine = ModelEngine(bundle, config, Metrics(registry))
        await engine.start()
        try:
            streams = [engine.submit(r) for r in requests]
            results = await asyncio.gather(*(s.result() for s in streams))
            # Every row is free once the last finish arrived (the worker counts them out before it posts).
            assert registry.get_sample_value("seqserve_active_rows", {"model": bundle.name}) == 0
            return results
        finally:
            await engine.stop(1.0)

    return asyncio.run(go())


def lm_prompts(tokenizer, count, seed):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 5))) for _ in range(count)]
    return [[BOS, *tokenizer.encode(t).ids] for t in texts]  # lengths 1 to ~30, "" included


def g2p_sources(tokenizer, count, seed):
    rng = random.Random(seed)
    return [tokenizer.encode("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9)))).ids
            for _ in range(count)]


def reference_start(model, inputs):
    if model.kind == "lm":
        return model.prefill(inputs)
    batch = make_pair_batch([(src, []) for src in inputs])
    return model.start(batch.src, batch.src_lengths, BOS)


def reference(model, inputs, params: DecodingParams):
    """The reference decoder's hypotheses (a list of n-best lists) for `inputs` under `params`."""
    start, state = reference_start(model, inputs)
    common = dict(eos_id=EOS, max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                  no_repeat_ngram_size=params.no_repeat_ngram_size, repetition_penalty=params.repetition_penalty,
                  prompt_tokens=inputs if model.kind == "lm" else None)
    if params.strategy == "beam":
        return beam_search(model.step_fn(), state, start, beam_size=params.beam_size,
                           length_penalty=params.length_penalty, n_best=params.n_best,
                           early_stopping=params.early_stopping, **common)
    if params.strategy == "sample":
        hyps = sample_decode(model.step_fn(), state, start, seed=params.seed, temperature=params.temperature,
                             top_k=params.top_k, top_p=params.top_p, **common)
    else:
        hyps = greedy_decode(model.step_fn(), state, start, **common)
    return [[h] for h in hyps]


def request(kind, index, ids, params, **extra):
    if kind == "lm":
        return GenerationRequest(f"r{index}", ids, params, **extra)
    return TranslationRequest(f"r{index}", ids, params, **extra)


def assert_same(got_events, expected):
    for event, n_best in zip(got_events, expected, strict=True):
        assert [h.tokens for h in event.hypotheses] == [h.tokens for h in n_best]
        assert [h.finish_reason.value for h in event.hypotheses] == [h.finish_reason for h in n_best]
        np.testing.assert_allclose([h.score for h in event.hypotheses], [h.score for h in n_best], atol=1e-4)


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
@pytest.mark.parametrize("params", [
    DecodingParams(strategy="greedy", max_new_tokens=24),
    DecodingParams(strategy="greedy", max_new_tokens=16, min_new_tokens=3, repetition_penalty=1.3,
                   no_repeat_ngram_size=3),
    DecodingParams(strategy="beam", beam_size=3, n_best=3, max_new_tokens=20),
    DecodingParams(strategy="beam", beam_size=4, n_best=2, length_penalty=0.6, early_stopping=True,
                   max_new_tokens=16, no_repeat_ngram_size=2),
], ids=["greedy", "greedy-processors", "beam", "beam-alpha-early"])
def test_engine_equals_reference_on_inputs_of_different_lengths(tiny, kind, params):
    model, bundle_dir = tiny[kind]
    tokenizers = load_bundle(bundle_dir).tokenizers
    inputs = (lm_prompts(tokenizers["text"], 12, seed=1) if kind == "lm"
              else g2p_sources(tokenizers["source"], 12, seed=1))
    assert len({len(i) for i in inputs}) > 4
    events = run_engine(bundle_dir, [request(kind, i, ids, params) for i, ids in enumerate(inputs)])
    expected = reference(model, inputs, params)
    assert_same(events, expected)
    assert any(len(n_best[0].tokens) > 2 for n_best in expected)  # the model says something


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(tiny):
    model, bundle_dir = tiny["lm"]
    tokenizer = load_bundle(bundle_dir).tokenizer("text")
    prompt = lm_prompts(tokenizer, 1, seed=5)[0]
    params = DecodingParams(strategy="sample", seed=1234, temperature=1.1, top_k=8, top_p=0.95, max_new_tokens=30)
    (alone,) = run_engine(bundle_dir, [GenerationRequest("alone", prompt, params)])

    rng = random.Random(9)
    crowd = []
    for i, other in enumerate(lm_prompts(tokenizer, 32, seed=6)):
        strategy = rng.choice(["sample", "greedy", "beam"])
        crowd.append(GenerationRequest(f"c{i}", other, DecodingParams(
            strategy=strategy, seed=rng.randrange(2**64), temperature=0.8, beam_size=2,
            max_new_tokens=rng.randint(5, 40))))
    events = run_engine(bundle_dir, crowd[:16] + [GenerationRequest("crowded", prompt, params)] + crowd[16:],
                        EngineConfig(max_rows=24))  # some of the crowd waits and joins mid-stream
    assert events[16].generated_ids == alone.generated_ids
    assert alone.seed == 1234
    assert alone.generated_ids == reference(model, [prompt], params)[0][0].tokens


@pytest.mark.parametrize("decode_thread", [True, False], ids=["decode-thread", "one-thread"])
def test_64_concurrent_mixed_requests_are_each_correct(tiny, decode_thread):
    model, bundle_dir = tiny["lm"]
    tokenizer = load_bundle(bundle_dir).tokenizer("text")
    rng = random.Random(3)
    prompts = lm_prompts(tokenizer, 64, seed=7)
    plans = []
    for prompt in prompts:
        strategy = rng.choice(["greedy", "beam", "sample"])
        params = DecodingParams(strategy=strategy, max_new_tokens=rng.randint(1, 30), beam_size=rng.choice([2, 3]),
                                n_best=1, seed=rng.randrange(2**32), temperature=rng.choice([0.7, 1.0]),
                                top_p=rng.choice([1.0, 0.9]), return_log_probs=True)
        plans.append((prompt, params))
    requests = [GenerationRequest(f"m{i}", p, params) for i, (p, params) in enumerate(plans)]
    # Fewer rows than the requests need: they queue, join mid-stream and leave as they finish.
    events = run_engine(bundle_dir, requests, EngineConfig(max_rows=40, max_prefill_tokens=64,
                                                           decode_thread=decode_thread))
    for event, (prompt, params) in zip(events, plans, strict=True):
        assert_same([event], [reference(model, [prompt], params)[0]])
        assert event.prompt_tokens == len(prompt)


def test_translation_attention_follows_each_hypothesis(tiny):
    """Attention rows returned for greedy and beam hypotheses equal a teacher-forced PyTorch pass."""
    model, bundle_dir = tiny["seq2seq"]
    sources = g2p_sources(load_bundle(bundle_dir).tokenizer("source"), 4, seed=11)
    params = [DecodingParams(max_new_tokens=12), DecodingParams(strategy="beam", beam_size=3, n_best=3,
                                                                max_new_tokens=12)]
    requests = [TranslationRequest(f"t{i}{j}", s, p, return_attention=True)
                for i, s in enumerate(sources) for j, p in enumerate(params)]
    events = run_engine(bundle_dir, requests)
    for req, event in zip(requests, events, strict=True):
        assert len(event.attention) == len(event.hypotheses)
        for hypothesis, attention in zip(event.hypotheses, event.attention, strict=True):
            fed = [BOS, *hypothesis.tokens]
            steps = len(hypothesis.tokens) + (hypothesis.finish_reason.value == "eos")
            assert attention.shape == (steps, len(req.source_ids))
            start, state = reference_start(model, [req.source_ids])
            *decoder_state, memory, mask = state
            with torch.no_grad():
                for step in range(steps):
                    out = model.decode_step(torch.tensor([fed[step]]), *decoder_state, memory, mask)
                    decoder_state = out[1:-1]
                    np.testing.assert_allclose(attention[step], out[-1][0].numpy(), atol=1e-5)


class _CountingSession:
    """An ONNX Runtime session that counts its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def test_lm_prefill_graph_gives_the_same_generations_as_step(tiny):
    """The state-only prefill graph is used when the bundle has one, and changes no token or score."""
    model, bundle_dir = tiny["lm"]
    bundle = load_bundle(bundle_dir, session_options=ONE_THREAD)
    assert set(bundle.graphs) == {"step", "prefill"}
    counting = _CountingSession(bundle.graphs["prefill"].session)
    with_prefill = dataclasses.replace(bundle, graphs={
        "step": bundle.graphs["step"], "prefill": dataclasses.replace(bundle.graphs["prefill"], session=counting)})
    step_only = dataclasses.replace(bundle, graphs={"step": bundle.graphs["step"]})
    inputs = lm_prompts(bundle.tokenizer("text"), 12, seed=4)
    params = [DecodingParams(strategy="greedy", max_new_tokens=16),
              DecodingParams(strategy="beam", beam_size=3, n_best=2, max_new_tokens=12)]
    requests = [GenerationRequest(f"p{i}{j}", ids, p) for i, ids in enumerate(inputs) for j, p in enumerate(params)]

    async def go(loaded):
        engine = ModelEngine(loaded, None)
        await engine.start()
        try:
            return await asyncio.gather(*(engine.submit(r).result() for r in requests))
        finally:
            await engine.stop(1.0)

    got, before = asyncio.run(go(with_prefill)), asyncio.run(go(step_only))
    assert counting.runs > 0
    for a, b in zip(got, before, strict=True):
        assert [h.tokens for h in a.hypotheses] == [h.tokens for h in b.hypotheses]
        np.testing.assert_allclose([h.score for h in a.hypotheses], [h.score for h in b.hypotheses], atol=1e-5)
    expected = reference(model, inputs, params[0])
    assert_same(got[::2], expected)
