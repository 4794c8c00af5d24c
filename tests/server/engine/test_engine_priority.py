"""Priorities end to end in the engine: a higher-priority request parks running rows, which resume later
with exactly the output they would have had (greedy, seeded sampling, text split over tokens, log-probs,
translations), nothing prefilled twice; a parked request cancelled keeps what it generated."""

from __future__ import annotations

import numpy as np
import pytest
from counted_engine import run_counted as run

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from server.bundle import load_bundle
from server.decoding import DecodingParams, FinishReason
from server.decoding.limits import RequestLimits
from server.engine import EngineConfig, FinishEvent, GenerationRequest, TranslationRequest
from server.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOS = 1
ENDLESS_TOKENS = 10_000_000  # no machine reaches it: the test ends these generations itself
ENDLESS = EngineConfig(max_rows=2, limits=RequestLimits(max_new_tokens=ENDLESS_TOKENS), prefix_cache_bytes=0)
SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))


def endless(**options) -> DecodingParams:
    return DecodingParams(max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS, **options)


# Two running rows that a higher priority will displace: a plain greedy one (text by table) and a seeded
# sampling one with log-probs and a stop string that never matches (text through a TextStream).
LOWS = (endless(), endless(strategy="sample", seed=11, temperature=0.9, return_log_probs=True, stop=("\x00",)))


@pytest.fixture(scope="module", params=["char", "bpe"])
def lm(request, tmp_path_factory, random_lm_bundle):
    """Untrained LMs: their tokens are close to random, so byte-level BPE splits characters over tokens."""
    return random_lm_bundle(tmp_path_factory.mktemp("engine-priority"), request.param)


class Reader:
    """One stream's events, read on demand: tokens, text and log-probs so far."""

    def __init__(self, stream):
        self.stream = stream
        self.ids: list[int] = []
        self.text = ""
        self.scores: list[float] = []
        self.finish: FinishEvent | None = None

    async def until(self, count: int) -> None:
        async for event in self.stream:
            if isinstance(event, FinishEvent):
                self.finish = event
                return
            self.ids += event.token_ids
            self.text += event.text
            self.scores += event.log_probs or []
            if len(self.ids) >= count:
                return

    async def close(self) -> None:
        self.stream.cancel()
        await self.until(ENDLESS_TOKENS)


def prompts(bundle) -> list[list[int]]:
    encode = bundle.tokenizer("text").encode
    return [[BOS, *encode("the cat sat").ids], [BOS, *encode("hello wörld").ids]]


def test_parked_rows_resume_with_the_same_output(lm):
    lows = list(zip(prompts(lm), LOWS, strict=True))

    async def displaced(counted):
        engine = counted.engine
        readers = [Reader(engine.submit(GenerationRequest(f"low{i}", ids, params)))
                   for i, (ids, params) in enumerate(lows)]
        for reader in readers:
            await reader.until(3)  # both rows run: the batch is full
        high = engine.submit(GenerationRequest("high", prompts(lm)[0], DecodingParams(max_new_tokens=6), priority=5))
        assert (await high.result()).reason is FinishReason.LENGTH
        assert counted.value("seqserve_preemptions_total") == 1
        counts = []
        for reader in readers:  # well past where it was parked, whenever that was
            await reader.until(len(reader.ids) + 30)
            counts.append(len(reader.ids))
            await reader.close()
        return readers, counts

    (parked_run, counts), counted = run(lm, ENDLESS, displaced)
    # Nothing was prefilled twice: the three prompts once each, whatever was parked and resumed.
    assert counted.value("seqserve_prefill_tokens_total") == sum(map(len, prompts(lm))) + len(prompts(lm)[0])
    assert counted.value("seqserve_parked_rows") == 0 and counted.value("seqserve_active_rows") == 0
    assert counted.value("seqserve_queue_wait_seconds_count", priority="5") == 1

    async def alone(counted):
        readers = [Reader(counted.engine.submit(GenerationRequest(f"low{i}", ids, params)))
                   for i, (ids, params) in enumerate(lows)]
        for reader, count in zip(readers, counts, strict=True):
            await reader.until(count)
            await reader.close()
        return readers

    reference, _ = run(lm, ENDLESS, alone)
    for got, expected, count in zip(parked_run, reference, counts, strict=True):
        assert got.ids[:count] == expected.ids[:count]
        np.testing.assert_allclose(got.scores[:count], expected.scores[:count], atol=1e-6)
        short = min(len(got.text), len(expected.text))  # a cancelled stream's text ends where it was read
        assert got.text[:short] == expected.text[:short] and short > 0


def test_a_parked_request_cancelled_keeps_what_it_generated(lm):
    one_row = EngineConfig(max_rows=1, limits=RequestLimits(max_new_tokens=ENDLESS_TOKENS), prefix_cache_bytes=0)
    ids = prompts(lm)[1]

    async def body(counted):
        engine = counted.engine
        low = Reader(engine.submit(GenerationRequest("low", ids, endless(), return_final_state=True)))
        await low.until(5)
        high = Reader(engine.submit(GenerationRequest("high", ids, endless(), priority=1)))
        await high.until(1)  # admitted in the plan that parked `low`
        assert counted.value("seqserve_parked_rows") == 1 and counted.value("seqserve_active_rows") == 1
        await low.close()  # cancelled while parked
        await high.close()
        return low.finish

    finish, counted = run(lm, one_row, body)
    assert finish.reason is FinishReason.CANCELLED and len(finish.generated_ids) >= 5
    assert counted.value("seqserve_parked_rows") == 0
    # Its state is the one before its last token, as for a row cancelled in the batch: feeding the prompt
    # and every generated token but that one gives it.
    assert finish.last_token_id == finish.generated_ids[-1]

    async def fed(counted):
        state, _ = await counted.engine.feed(None, ids + finish.generated_ids[:-1])
        return state

    state, _ = run(lm, one_row, fed)
    for got, want in zip(finish.final_state, state, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_priority_outside_the_range_is_refused_naming_the_field(lm):
    async def body(counted):
        for priority in (11, -11, 2.5):
            with pytest.raises(InvalidArgument, match=r"priority must be an integer in \[-10, 10\]") as caught:
                counted.engine.submit(GenerationRequest("x", [BOS], DecodingParams(), priority=priority))
            assert caught.value.field == "priority"

    run(lm, ENDLESS, body)


@pytest.fixture(scope="module")
def translator(tiny_runs, tmp_path_factory):
    path = export_run(tiny_runs["lstm", "seq2seq"], tmp_path_factory.mktemp("priority-g2p"), "tiny-g2p",
                      options=SMALL_EXPORT).path
    return load_bundle(path, session_options={"intra_op_num_threads": 1, "inter_op_num_threads": 1})


def test_parked_translations_keep_their_encoder_memory(translator):
    sources = [[4, 5, 6, 7, 8, 9], [5, 6]]  # memory of two widths: the batch pads it, parking cuts it

    async def translate(counted, displace: bool):
        engine = counted.engine
        readers = [Reader(engine.submit(TranslationRequest(f"t{i}", source, endless(return_log_probs=True))))
                   for i, source in enumerate(sources)]
        for reader in readers:
            await reader.until(2)
        if displace:
            await engine.submit(TranslationRequest("high", [4] * 9, DecodingParams(max_new_tokens=4),
                                                   priority=3)).result()
            assert counted.value("seqserve_preemptions_total") == 1
        for reader in readers:
            await reader.until(40)
            await reader.close()
        return [(reader.ids[:40], reader.scores[:40]) for reader in readers]

    displaced, _ = run(translator, ENDLESS, lambda counted: translate(counted, True))
    alone, _ = run(translator, ENDLESS, lambda counted: translate(counted, False))
    for (ids, scores), (expected_ids, expected_scores) in zip(displaced, alone, strict=True):
        assert ids == expected_ids
        np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
