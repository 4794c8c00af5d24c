"""server/engine/binding.py: the decode step through IO binding (state kept in ONNX Runtime buffers
between steps) gives the same numbers as the plain call, and the engine the same tokens, on the CPU
provider; only tokens and log-probs cross while the batch keeps its rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.decoding import DecodingParams
from server.engine import EngineConfig, FinishEvent, GenerationRequest, ModelEngine
from server.engine.batch import DecodeBatch
from server.engine.binding import DeviceTensor
from server.engine.runner import Runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, random_lm_bundle):
    return random_lm_bundle(tmp_path_factory.mktemp("binding"), "bpe")


def test_bound_steps_equal_plain_steps_through_joins_leaves_and_reorders(bundle):
    plain, bound = Runner(bundle, "off"), Runner(bundle, "on")
    assert plain.bound is None and bound.bound is not None and bound.bound.device == "cpu"
    assert Runner(bundle).bound is None  # auto: only where the session runs on a CUDA device
    rng = np.random.default_rng(0)
    rows = 6
    start = DecodeBatch(plain.zero_state(rows), rng.integers(4, 200, rows), np.arange(rows), np.zeros(rows, np.int64))
    batches, kept, device_steps = [start, start], False, 0
    for step in range(12):
        sent = bound.bound.bytes_to_device
        outputs = [runner.decode(batch) for runner, batch in zip((plain, bound), batches, strict=True)]
        (log_probs, state, _), (bound_log_probs, bound_state, _) = outputs
        if kept:  # the state stayed in its buffers: only the tokens and lengths went in
            assert bound.bound.bytes_to_device - sent == 16 * len(log_probs)
            device_steps += 1
        np.testing.assert_array_equal(log_probs, bound_log_probs)
        assert all(isinstance(t, DeviceTensor) for t in bound_state)
        for a, b in zip(state, bound_state, strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
        tokens = log_probs.argmax(axis=1)
        if step % 4 == 3:  # rows leave and the rest reorder (as beams do), then a row joins
            index = rng.permutation(len(tokens))[: max(1, len(tokens) - 2)]
            batches = [b.advance(s, index, tokens[index]) for b, s in zip(batches, (state, bound_state), strict=True)]
            joining = DecodeBatch(plain.zero_state(1), np.array([5]), np.array([99]), np.zeros(1, np.int64))
            batches = [DecodeBatch.concatenate([b, joining]) for b in batches]
            kept = False
        else:  # every row goes on
            batches = [b.advance(s, np.arange(len(tokens)), tokens)
                       for b, s in zip(batches, (state, bound_state), strict=True)]
            assert batches[1].state is bound_state
            kept = True
    assert device_steps >= 6


def test_the_engine_gives_the_same_tokens_with_io_binding(bundle):
    """Greedy, sampling and beam requests of different lengths join and leave a running batch."""
    tokenizer = bundle.tokenizer("text")
    prompts = [[1, *tokenizer.encode(text).ids] for text in ("the cat", "日本", "stop", "AA B")]
    requests = []
    for i in range(12):
        params = [DecodingParams(max_new_tokens=3 + 5 * (i % 4)),
                  DecodingParams(strategy="sample", seed=i, max_new_tokens=6 + i),
                  DecodingParams(strategy="beam", beam_size=3, max_new_tokens=5 + i % 3)][i % 3]
        requests.append((prompts[i % len(prompts)], params, 0.002 * (i % 5)))

    async def run(mode):
        engine = ModelEngine(bundle, EngineConfig(io_binding=mode))
        await engine.start()

        async def one(prompt_ids, params, delay):
            await asyncio.sleep(delay)
            async for event in engine.submit(GenerationRequest("r", prompt_ids, params)):
                if isinstance(event, FinishEvent):
                    return [h.tokens for h in event.hypotheses], event.text
        try:
            return await asyncio.gather(*(one(*r) for r in requests))
        finally:
            await engine.stop(1.0)

    plain = asyncio.run(run("off"))
    assert asyncio.run(run("on")) == plain
    assert any(len(tokens[0]) > 3 for tokens, _ in plain)


def test_io_binding_setting_is_checked():
    with pytest.raises(ValueError, match="io_binding"):
        EngineConfig(io_binding="yes")


def test_a_failing_bound_call_falls_back_to_plain_calls(bundle, caplog):
    plain, bound = Runner(bundle, "off"), Runner(bundle, "on")
    batch = DecodeBatch(plain.zero_state(2), np.array([5, 6]), np.arange(2), np.zeros(2, np.int64))
    _, state, _ = bound.decode(batch)  # bound buffers
    expected = plain.decode(DecodeBatch(tuple(np.array(s) for s in state), batch.tokens, batch.owners, batch.groups))

    def broken(tokens, state):
        raise RuntimeError("no such device")

    bound.bound.run = broken
    log_probs, new_state, _ = bound.decode(DecodeBatch(state, batch.tokens, batch.owners, batch.groups))
    assert bound.bound is None and "IO binding failed" in caplog.text
    np.testing.assert_array_equal(log_probs, expected[0])
