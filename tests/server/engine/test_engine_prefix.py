"""The engine's prefix cache end to end: outputs identical with it on and off, what it saves (counted by
seqserve_prefill_tokens_total), sessions' prefixes through it, and its states gone with the engine."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from counted_engine import run_counted as run

from server.decoding import DecodingParams
from server.engine import EngineConfig, GenerationRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOS = 1
STRIDE = 8  # small, so that the short prompts of a test cross several stops
ON = EngineConfig(prefix_cache_stride=STRIDE)
OFF = EngineConfig(prefix_cache_bytes=0)
PREAMBLE = "the cat sat on the mat, and the other cat sat on the wood; "  # every character in the vocabulary


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, random_lm_bundle):
    return random_lm_bundle(tmp_path_factory.mktemp("engine-prefix"), "char")


def ids(bundle, text: str) -> list[int]:
    return [BOS, *bundle.tokenizer("text").encode(text).ids]


def requests(bundle) -> list[GenerationRequest]:
    """Prompts that share prefixes, repeat and extend one another, under every strategy."""
    texts = [PREAMBLE + tail for tail in ("red", "pale", "red", "red mat", "p")] + [PREAMBLE[:20], PREAMBLE]
    strategies = [
        DecodingParams(max_new_tokens=12),
        DecodingParams(strategy="sample", seed=7, temperature=0.8, top_p=0.9, max_new_tokens=12,
                       return_log_probs=True),
        DecodingParams(strategy="beam", beam_size=3, max_new_tokens=8),
        DecodingParams(max_new_tokens=10, repetition_penalty=1.3, top_logprobs=2, return_log_probs=True),
    ]
    return [GenerationRequest(f"r{i}-{j}", ids(bundle, text), params)
            for i, text in enumerate(texts) for j, params in enumerate(strategies)]


def outcome(finish, events) -> dict:
    scores = [p for e in events if e.log_probs for p in e.log_probs]
    return {"ids": finish.generated_ids, "text": finish.text, "reason": finish.reason,
            "hypotheses": [(h.tokens, h.score, h.log_prob) for h in finish.hypotheses], "scores": scores}


async def one_by_one(counted, batch):
    results = []
    for request in batch:
        events = [event async for event in counted.engine.submit(dataclasses.replace(request))]
        results.append(outcome(events[-1], events[:-1]))
    return results


async def all_at_once(counted, batch):
    streams = [counted.engine.submit(dataclasses.replace(request)) for request in batch]

    async def collect(stream):
        events = [event async for event in stream]
        return outcome(events[-1], events[:-1])

    return await asyncio.gather(*(collect(stream) for stream in streams))


def assert_same(with_cache: list[dict], without: list[dict]) -> None:
    for got, expected in zip(with_cache, without, strict=True):
        assert (got["ids"], got["text"], got["reason"]) == (expected["ids"], expected["text"], expected["reason"])
        assert [h[0] for h in got["hypotheses"]] == [h[0] for h in expected["hypotheses"]]
        np.testing.assert_allclose([h[1:] for h in got["hypotheses"]], [h[1:] for h in expected["hypotheses"]],
                                   atol=1e-5)
        np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-5)


@pytest.mark.parametrize("order", [one_by_one, all_at_once])
def test_outputs_are_the_same_with_the_cache_on_and_off(bundle, order):
    batch = requests(bundle)
    without, off = run(bundle, OFF, lambda counted: order(counted, batch))
    with_cache, on = run(bundle, ON, lambda counted: order(counted, batch))
    assert_same(with_cache, without)
    assert off.value("seqserve_prefix_cache_lookups_total", result="miss") == 0 and off.engine.prefix_cache.states == 0
    prompt_tokens = on.value("seqserve_prompt_tokens_total")
    assert prompt_tokens == off.value("seqserve_prompt_tokens_total")
    saved = on.value("seqserve_prefix_cache_hit_tokens_total")
    # What the cache saved is exactly what the prefill did not compute.
    assert on.computed == off.computed - saved
    if order is one_by_one:
        assert saved > 0.6 * prompt_tokens
    assert on.value("seqserve_prefix_cache_lookups_total", result="hit") + \
        on.value("seqserve_prefix_cache_lookups_total", result="miss") == len(batch)


def test_autocomplete_computes_one_token_per_keystroke(bundle):
    """A client resending its whole text after each keystroke: each prompt resumes from the state after the
    previous one and feeds only the new character."""
    text = PREAMBLE * 2  # past several stops

    async def body(counted):
        computed = []
        for end in range(1, len(text) + 1):
            before = counted.computed
            await counted.engine.submit(GenerationRequest(f"k{end}", ids(bundle, text[:end]),
                                                          DecodingParams(max_new_tokens=2))).result()
            computed.append(counted.computed - before)
        return computed

    computed, counted = run(bundle, ON, body)
    assert computed == [2] + [1] * (len(text) - 1)  # <bos> and the first character, then one a keystroke
    # keystroke k (k >= 2) resumes after its k - 1 characters and <bos>
    assert counted.value("seqserve_prefix_cache_hit_tokens_total") == sum(range(2, len(text) + 1))


def test_a_shared_preamble_is_computed_once_and_then_only_the_tails(bundle):
    tails = ["red", "pale", "white", "whit", "dots"]
    preamble = ids(bundle, PREAMBLE)

    async def body(counted):
        computed = []
        for tail in tails:
            before = counted.computed
            await counted.engine.submit(GenerationRequest(tail, ids(bundle, PREAMBLE + tail),
                                                          DecodingParams(max_new_tokens=2))).result()
            computed.append(counted.computed - before)
        return computed

    computed, _ = run(bundle, ON, body)
    first, second, *rest = computed
    assert first == len(preamble) + len(tails[0])
    # The second resumes from the last stop inside the preamble, and keeps the state where the two part.
    assert second == len(preamble) - (len(preamble) // STRIDE) * STRIDE + len(tails[1])
    assert rest == [len(tail) for tail in tails[2:]]  # the later ones resume from that parting point


def test_a_session_prefix_is_fed_through_the_cache(bundle):
    """CreateSession feeds its prefix from the zero state (None): Generates of that text primed the cache (the
    first keeps the state after it, the repeat the state before its last token), and the state the session
    gets is the one feeding gives without the cache."""
    history = ids(bundle, PREAMBLE + "red")

    async def body(counted):
        engine = counted.engine
        for _ in range(2):
            await engine.submit(GenerationRequest("g", history, DecodingParams(max_new_tokens=2))).result()
        before = counted.computed
        state, _ = await engine.feed(None, history[:-1], next_token_id=history[-1])
        return state, counted.computed - before

    (cached_state, computed), _ = run(bundle, ON, body)
    assert computed == 0  # the repeat kept the state before its last token: the session's form

    async def plain(counted):
        state, _ = await counted.engine.feed(None, history[:-1])
        return state

    expected, _ = run(bundle, OFF, plain)
    for got, want in zip(cached_state, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_feeds_from_a_state_and_log_prob_feeds_leave_the_cache_alone(bundle):
    history = ids(bundle, PREAMBLE)

    async def body(counted):
        engine = counted.engine
        state, _ = await engine.feed(engine.zero_state(), history)  # a session's feed: its own state
        await engine.feed(None, history, want_log_probs=True)  # needs every position's log-probs
        return engine.prefix_cache.states

    states, counted = run(bundle, ON, body)
    assert states == 0 and counted.value("seqserve_prefix_cache_lookups_total", result="miss") == 0


def test_a_small_cache_stays_within_its_bytes_and_outputs_stay_the_same(bundle):
    batch = requests(bundle)[::2]
    small = dataclasses.replace(ON, prefix_cache_bytes=6_000)  # a few states of the random model
    without, _ = run(bundle, OFF, lambda counted: one_by_one(counted, batch))

    async def body(counted):
        results = await one_by_one(counted, batch)
        return results, counted.engine.prefix_cache.bytes

    (with_cache, held), counted = run(bundle, small, body)
    assert_same(with_cache, without)
    assert 0 < held <= 6_000 and counted.value("seqserve_prefix_cache_evictions_total") > 0


def test_stopping_the_engine_drops_its_states(bundle):
    async def body(counted):
        await counted.engine.submit(GenerationRequest("a", ids(bundle, PREAMBLE), DecodingParams(max_new_tokens=2))
                                    ).result()
        return counted.value("seqserve_prefix_cache_bytes"), counted.engine.prefix_cache.bytes

    (held, bytes_), counted = run(bundle, ON, body)
    assert held == bytes_ > 0
    assert counted.value("seqserve_prefix_cache_bytes") == 0 and counted.engine.prefix_cache.states == 0


def test_a_new_prompt_costs_no_extra_call_and_a_repeat_keeps_the_sessions_form(bundle):
    """A short prompt seen for the first time is one prefill call, as without the cache (its state after it
    is kept); the first repeat stops before its last token to keep that state too; the next feeds one."""
    prompt = ids(bundle, "the cat sat")

    async def body(counted):
        engine = counted.engine
        calls = []
        prefill = engine.runner.prefill

        def counting(sequences, *args, **kwargs):
            calls.append([len(sequence) for sequence in sequences])
            return prefill(sequences, *args, **kwargs)

        engine.runner.prefill = counting
        for round_ in range(3):
            await engine.submit(GenerationRequest(f"p{round_}", prompt, DecodingParams(max_new_tokens=1))).result()
        return calls

    calls, _ = run(bundle, EngineConfig(), body)
    n = len(prompt)
    assert calls == [[n], [n - 1], [1], [1]]
