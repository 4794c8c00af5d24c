"""The engine's control paths: stop strings, cancellation, limits, deadlines, sessions' feed, metrics, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from server.bundle import load_bundle
from server.decoding import DecodingParams, FinishReason
from server.decoding.limits import RequestLimits
from server.engine import (
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    ModelEngine,
    TokenEvent,
    TranslationRequest,
)
from server.engine.core import EngineCore
from server.engine.requests import StreamTable
from server.engine.runner import Runner
from server.engine.scheduler import Entry, Plan
from server.engine.validation import validate_request
from server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from server.metrics import Metrics
from server.sessions.port import SessionEngine
from training.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOS = 1
SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))
ONE_THREAD = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
# Generations that only end when the test ends them: no machine is fast enough to reach their length.
ENDLESS_TOKENS = 10_000_000
LONG = DecodingParams(max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)
ENDLESS_LIMITS = RequestLimits(max_new_tokens=ENDLESS_TOKENS)
ENDLESS_CONFIG = EngineConfig(limits=ENDLESS_LIMITS)


@pytest.fixture(scope="module")
def lm(tiny_runs, tmp_path_factory):
    """(PyTorch model, loaded bundle) of the tiny LSTM LM."""
    run = tiny_runs["lstm", "lm"]
    path = export_run(run, tmp_path_factory.mktemp("engine-control"), "tiny-lm", options=SMALL_EXPORT).path
    return model_from_checkpoint(load_checkpoint(find_checkpoint(run))), load_bundle(path, session_options=ONE_THREAD)


def with_engine(bundle, body, config=None, metrics=None):
    async def go():
        engine = ModelEngine(bundle, config if config is not None else ENDLESS_CONFIG, metrics)
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop(1.0)

    return asyncio.run(go())


class Gauges:
    """The engine's load as an operator sees it: tiny-lm's row and queue gauges, set on the engine's worker."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)

    def load(self) -> tuple[float, float]:
        """(rows in use, requests queued). No rows in use means no request is decoding: each holds one or more."""
        value = self.registry.get_sample_value
        return value("seqserve_active_rows", {"model": "tiny-lm"}), value("seqserve_queue_depth", {"model": "tiny-lm"})

    def rows(self) -> float:
        return self.load()[0]

    async def until(self, condition, timeout: float = 10.0) -> None:
        """Poll until `condition()` holds: the worker sets the gauges when it plans and steps."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not condition():
            assert loop.time() < end, "the engine's gauges did not reach the condition in time"
            await asyncio.sleep(0.005)


async def collect(stream):
    events = [event async for event in stream]
    assert isinstance(events[-1], FinishEvent)
    return events[:-1], events[-1]


def prompt(bundle, text):
    return [BOS, *bundle.tokenizer("text").encode(text).ids]


def assert_fed_as_pytorch(model, ids, state, log_probs):
    """`state` and `log_probs` are what feeding ids[:-1] (then scoring ids[-1]) gives in PyTorch."""
    with torch.no_grad():
        ref = model(torch.tensor([ids[:-1]]), torch.tensor([len(ids) - 1]), *model.initial_state(1))
    expected = ref[0][0, torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(log_probs, expected, atol=1e-5)
    for got, want in zip(state, ref[1:], strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_stop_strings_never_reach_the_client(lm):
    _, bundle = lm
    sampled = DecodingParams(strategy="sample", seed=42, max_new_tokens=60)
    ids = prompt(bundle, "the cat")

    async def body(engine):
        _, free = await collect(engine.submit(GenerationRequest("free", ids, sampled)))
        full = free.text
        assert len(full) > 12
        stop = full[6:10]  # spans several tokens of the char tokenizer
        cut = full.index(stop)
        stopped_params = DecodingParams(strategy="sample", seed=42, max_new_tokens=60, stop=(stop, "never seen"))
        tokens, finish = await collect(engine.submit(GenerationRequest("stop", ids, stopped_params)))
        assert finish.reason is FinishReason.STOP_SEQUENCE
        assert finish.hypotheses[0].finish_reason is FinishReason.STOP_SEQUENCE
        assert finish.text == "".join(t.text for t in tokens) == full[:cut]
        assert all(stop not in t.text for t in tokens)
        # The tokens end with the one that completed the stop string.
        assert finish.generated_ids == free.generated_ids[: len(finish.generated_ids)]
        assert bundle.tokenizer("text").decode(finish.generated_ids).endswith(stop)
        # Beam hypotheses are cut the same way.
        beam = DecodingParams(strategy="beam", beam_size=2, max_new_tokens=60)
        _, beam_free = await collect(engine.submit(GenerationRequest("bf", ids, beam)))
        assert len(beam_free.text) > 4
        beam_stop = beam_free.text[2:4]
        _, beam_cut = await collect(engine.submit(GenerationRequest(
            "bc", ids, DecodingParams(strategy="beam", beam_size=2, max_new_tokens=60, stop=(beam_stop,)))))
        assert beam_cut.reason is FinishReason.STOP_SEQUENCE
        assert beam_cut.text == beam_free.text[: beam_free.text.index(beam_stop)]

    with_engine(bundle, body)


def test_cancelled_and_disconnected_requests_free_their_rows(lm):
    _, bundle = lm
    gauges = Gauges()

    async def body(engine):
        streams = [engine.submit(GenerationRequest(f"c{i}", prompt(bundle, "a"), LONG)) for i in range(4)]
        beam = engine.submit(GenerationRequest("b", prompt(bundle, "a"), DecodingParams(
            strategy="beam", beam_size=3, max_new_tokens=100_000, min_new_tokens=100_000)))
        for stream in streams:
            assert isinstance(await stream.__anext__(), TokenEvent)
        await gauges.until(lambda: gauges.rows() >= 7)
        assert gauges.rows() == 7

        async def consume(stream):
            async for _ in stream:
                pass

        consumers = [asyncio.create_task(consume(s)) for s in (streams[0], beam)]
        await asyncio.sleep(0.01)
        for task in consumers:  # a gRPC client going away cancels the handler's task
            task.cancel()
        streams[1].cancel()
        await gauges.until(lambda: gauges.rows() <= 2)
        assert gauges.rows() == 2
        rest = [event async for event in streams[1]]
        assert rest[-1].reason is FinishReason.CANCELLED
        for stream in streams[2:]:
            stream.cancel()
        await gauges.until(lambda: gauges.rows() == 0)
        assert gauges.load() == (0, 0)

    with_engine(bundle, body, metrics=gauges.metrics)
    assert gauges.rows() == 0
    assert gauges.registry.get_sample_value("seqserve_finished_total",
                                            {"model": "tiny-lm", "reason": "cancelled"}) == 5


def test_queue_full_is_resource_exhausted(lm):
    _, bundle = lm
    params = DecodingParams(max_new_tokens=5)

    async def body(engine):
        busy = engine.submit(GenerationRequest("busy", prompt(bundle, "a"), LONG))
        await anext(busy)  # it holds the only row: what comes next waits in the queue
        streams = [engine.submit(GenerationRequest(f"q{i}", prompt(bundle, "a"), params)) for i in range(3)]
        with pytest.raises(ResourceExhausted, match="queue"):
            engine.submit(GenerationRequest("over", prompt(bundle, "a"), params))
        busy.cancel()
        finishes = [await s.result() for s in streams]  # the queued ones still run, one row at a time
        assert [f.reason for f in finishes] == [FinishReason.LENGTH] * 3

    with_engine(bundle, body, EngineConfig(max_rows=1, max_queued=3, limits=ENDLESS_LIMITS))


def test_bad_requests_are_refused_on_entry(lm):
    _, bundle = lm
    vocab = bundle.manifest.sizes.vocab_size
    gauges = Gauges()

    async def body(engine):
        ok = DecodingParams(max_new_tokens=5)
        cases = [
            (GenerationRequest("long", [BOS] * 9, ok), InvalidArgument, "more than this server's limit of 8"),
            (GenerationRequest("empty", [], ok), InvalidArgument, "prompt_ids must not be empty"),
            (GenerationRequest("oov", [BOS, vocab], ok), InvalidArgument, r"prompt_ids\[1\] must be a token id"),
            (GenerationRequest("p", [BOS], DecodingParams(top_p=1.5)), InvalidArgument, "top_p must be in"),
            (GenerationRequest("n", [BOS], DecodingParams(max_new_tokens=101)), InvalidArgument, "max_new_tokens"),
            (GenerationRequest("k", [BOS], DecodingParams(strategy="beam", beam_size=5)), InvalidArgument,
             "beam_size"),
            (GenerationRequest("s", [BOS], ok, initial_state=(np.zeros((1, 2)),)), InvalidArgument, "initial_state"),
            (TranslationRequest("t", [4], ok), FailedPrecondition, "language model"),
        ]
        for req, error, message in cases:
            with pytest.raises(error, match=message):
                engine.submit(req)
        assert gauges.load() == (0, 0)

    limits = RequestLimits(max_input_tokens=8, max_new_tokens=100)
    with_engine(bundle, body, EngineConfig(max_rows=4, limits=limits), gauges.metrics)


def test_a_feed_longer_than_the_input_limit_goes_in_pieces(lm):
    model, bundle = lm
    ids = prompt(bundle, "the dog ran under the mat and the cat sat")
    assert len(ids) > 3 * 4

    async def body(engine):  # 4 tokens per piece: the feed below is several pieces, each after the one before
        state, log_probs = await engine.feed(None, ids[:-1], want_log_probs=True, next_token_id=ids[-1])
        assert_fed_as_pytorch(model, ids, state, log_probs)
        unscored, none = await engine.feed(None, ids[:-1])
        assert none is None
        for got, want in zip(unscored, state, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)

    with_engine(bundle, body, EngineConfig(max_rows=4, limits=RequestLimits(max_input_tokens=4, max_new_tokens=100)))


def test_park_takes_the_final_state_or_feeds_what_was_chosen(lm):
    _, bundle = lm
    ids = prompt(bundle, "the dog ran")
    eos = bundle.spec.special.eos

    async def body(engine):
        start, _ = await engine.feed(None, ids[:-1])
        finish = await engine.submit(GenerationRequest("g", [ids[-1]], DecodingParams(max_new_tokens=6),
                                                       initial_state=start, history_ids=ids,
                                                       return_final_state=True)).result()
        assert finish.final_state is not None and finish.generated_ids
        parked, chosen = await engine.park(start, ids[-1], finish)
        assert parked is finish.final_state and chosen == finish.generated_ids
        # Without a final state (a beam's finish), the chosen tokens are fed: the same state.
        fed, chosen_again = await engine.park(start, ids[-1], dataclasses.replace(finish, final_state=None))
        assert chosen_again == chosen
        for got, want in zip(fed, parked, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
        # An <eos> the model chose belongs to the session; nothing chosen leaves the state as it was.
        ended = dataclasses.replace(finish, reason=FinishReason.EOS, final_state=None)
        _, with_eos = await engine.park(start, ids[-1], ended)
        assert with_eos == [*finish.generated_ids, eos]
        nothing = dataclasses.replace(finish, reason=FinishReason.CANCELLED, generated_ids=[], final_state=None,
                                      last_token_id=None)
        assert await engine.park(start, ids[-1], nothing) == (start, [])

    with_engine(bundle, body)


def test_the_engine_is_what_sessions_take_it_for(lm):
    """ModelEngine has every member of server.sessions.port.SessionEngine, with the same parameters."""
    _, bundle = lm
    engine = ModelEngine(bundle, ENDLESS_CONFIG)
    members = [name for name in vars(SessionEngine) if not name.startswith("_")]
    members += list(SessionEngine.__annotations__)
    expected = {"zero_state", "feed", "submit", "park", "tokenizer", "max_input_tokens", "accepting", "spec"}
    assert expected <= set(members)
    for name in members:
        assert hasattr(engine, name), name
        declared = vars(SessionEngine).get(name)
        if inspect.isfunction(declared):
            assert (list(inspect.signature(declared).parameters)
                    == list(inspect.signature(getattr(ModelEngine, name)).parameters)), name


def test_deadlines_end_queued_and_running_requests(lm):
    _, bundle = lm
    gauges = Gauges()

    async def body(engine):
        late = engine.submit(GenerationRequest("late", prompt(bundle, "a"), LONG, deadline=time.monotonic() - 1))
        with pytest.raises(DeadlineExceeded):
            await late.result()
        # An endless generation ends only by its deadline, whether it ran by then or still waited.
        running = engine.submit(GenerationRequest("run", prompt(bundle, "a"), LONG,
                                                  deadline=time.monotonic() + 0.2))
        with pytest.raises(DeadlineExceeded, match="passed its deadline"):
            async for _ in running:
                pass
        assert gauges.load() == (0, 0)

    with_engine(bundle, body, metrics=gauges.metrics)


def test_feed_and_session_continuation_match_pytorch(lm):
    model, bundle = lm
    ids = prompt(bundle, "the dog ran under the mat")

    async def body(engine):
        # Feed alongside generations: the same batched prefill call serves both.
        others = [engine.submit(GenerationRequest(f"o{i}", prompt(bundle, "a big cat" * (i + 1)),
                                                  DecodingParams(max_new_tokens=8))) for i in range(3)]
        state, log_probs = await engine.feed(None, ids[:-1], want_log_probs=True, next_token_id=ids[-1])
        await asyncio.gather(*(o.result() for o in others))
        assert_fed_as_pytorch(model, ids, state, log_probs)

        # A session's continuation from the fed state equals one generation from the whole prompt.
        greedy = DecodingParams(max_new_tokens=20)
        whole = await engine.submit(GenerationRequest("whole", ids, greedy)).result()
        parked = await engine.submit(GenerationRequest("cont", [ids[-1]], greedy, initial_state=state,
                                                       history_ids=ids)).result()
        assert parked.generated_ids == whole.generated_ids

        # return_final_state parks the state before the last chosen token; continuing from it goes on.
        first = await engine.submit(GenerationRequest("first", ids, DecodingParams(max_new_tokens=8),
                                                      return_final_state=True)).result()
        assert first.reason is FinishReason.LENGTH and first.last_token_id == first.generated_ids[-1]
        second = await engine.submit(GenerationRequest(
            "second", [first.last_token_id], DecodingParams(max_new_tokens=12),
            initial_state=first.final_state, history_ids=ids + first.generated_ids)).result()
        assert first.generated_ids + second.generated_ids == whole.generated_ids
        assert first.text + second.text == whole.text

    with_engine(bundle, body)


def test_metrics_record_the_engine(lm):
    _, bundle = lm
    registry = CollectorRegistry()

    async def body(engine):
        streams = [engine.submit(GenerationRequest(f"m{i}", prompt(bundle, "a cat"), DecodingParams(
            strategy="beam" if i % 2 else "greedy", beam_size=2, max_new_tokens=6))) for i in range(4)]
        return [await s.result() for s in streams]

    finishes = with_engine(bundle, body, metrics=Metrics(registry))
    labels = {"model": "tiny-lm"}
    value = registry.get_sample_value
    assert value("seqserve_batch_size_count", labels) >= 6
    assert value("seqserve_batch_size_sum", labels) >= 6 * (2 + 2 * 2) * 0.5
    assert value("seqserve_decode_step_duration_seconds_count", labels) == value("seqserve_batch_size_count", labels)
    assert value("seqserve_queue_wait_seconds_count", {**labels, "priority": "0"}) == 4
    assert value("seqserve_prompt_tokens_total", labels) == 4 * len(prompt(bundle, "a cat"))
    # Admitted together, none found another's prefix: the greedy ones computed their whole prompt, the beam
    # ones all but the last token (their beams start from it).
    assert value("seqserve_prefill_tokens_total", labels) == 4 * len(prompt(bundle, "a cat")) - 2
    assert value("seqserve_prefix_cache_lookups_total", {**labels, "result": "miss"}) == 4
    assert value("seqserve_generated_tokens_total", labels) == sum(len(f.generated_ids) for f in finishes)
    assert sum(value("seqserve_finished_total", {**labels, "reason": r}) or 0 for r in ("eos", "length")) == 4
    assert value("seqserve_active_rows", labels) == 0 and value("seqserve_queue_depth", labels) == 0
    assert value("seqserve_model_load_duration_seconds_count", labels) == 1
    # model_info is removed when the engine stops; it was set while serving (checked in the registry test).


def test_stop_drains_in_flight_requests_then_refuses(lm):
    _, bundle = lm

    async def go():
        # The grace period is long enough for 30 tokens even on a loaded machine, far too short for 10^6.
        engine = ModelEngine(bundle, EngineConfig(limits=RequestLimits(max_new_tokens=1_000_000)))
        await engine.start()
        short = engine.submit(GenerationRequest("s", prompt(bundle, "a"), DecodingParams(max_new_tokens=30,
                                                                                         min_new_tokens=30)))
        endless = engine.submit(GenerationRequest("e", prompt(bundle, "a"), DecodingParams(
            max_new_tokens=1_000_000, min_new_tokens=1_000_000)))
        stopping = asyncio.create_task(engine.stop(2.0))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            engine.submit(GenerationRequest("late", prompt(bundle, "a"), DecodingParams()))
        assert (await short.result()).reason is FinishReason.LENGTH
        await stopping
        with pytest.raises(Unavailable, match="unloaded"):
            await endless.result()

    asyncio.run(go())


def test_joining_requests_get_their_first_token_before_the_step_of_everyone_else(lm):
    """`EngineCore.admit` prefills the joining requests and gives the greedy/sampling ones their first
    token at once (the engine posts it before the batch's step ends), while the batch's step runs; the
    joining rows join after it; beam requests start at the next step; a request whose first token ends
    it never takes a row."""
    _, bundle = lm
    config = ENDLESS_CONFIG
    core = EngineCore(bundle, Runner(bundle))
    ids = prompt(bundle, "the cat")

    consumer = StreamTable()

    def entry(slot, params):
        request = GenerationRequest(f"r{slot}", ids, params)
        params, rows, input_tokens = validate_request(request, bundle, config)
        return Entry(slot=slot, request=request, params=params, rows=rows, input_tokens=input_tokens,
                     enqueued_at=0.0, consumer=consumer, key=slot)

    def tokens_by_key(result) -> dict[int, list[int]]:
        """Every token a step handed out (plain rows' by array, the others' in events), by request key."""
        tokens = {}
        for _, keys, chosen in result.plain:
            for key, token in zip(keys.tolist(), chosen.tolist(), strict=True):
                tokens.setdefault(key, []).append(token)
        for e, ev in result.events:
            if isinstance(ev, TokenEvent):
                tokens.setdefault(e.key, []).extend(ev.token_ids)
        return tokens

    running = entry(0, LONG)
    core.admit(Plan(admit=[running]))
    core.decode()  # `running` has two tokens now and sits in the batch
    joining = [entry(1, DecodingParams(max_new_tokens=8)), entry(2, DecodingParams(strategy="beam", beam_size=3)),
               entry(3, DecodingParams(max_new_tokens=1))]
    admitted = core.admit(Plan(admit=joining))
    firsts = tokens_by_key(admitted)
    assert set(firsts) == {1, 3}  # greedy ones: a token each; beam: nothing yet; `running`: not stepped
    assert [(e.slot, reason) for e, reason in admitted.finished] == [(3, "length")]
    assert admitted.rows == 0 and admitted.generated_tokens == 2
    # `running`'s step ran during the admission; the admitted rows join once it is done.
    assert core.batch.owners.tolist() == [0]
    stepped = core.decode()
    assert list(tokens_by_key(stepped)) == [0] and stepped.rows == 1
    assert sorted(core.batch.owners.tolist()) == [0, 1, 2, 2, 2]
    stepped = core.decode()
    assert set(tokens_by_key(stepped)) == {0, 1}
    assert stepped.rows == 5
    core.close()

    # The first token is the one the reference greedy decoder picks: the same as joining an empty batch.
    alone = EngineCore(bundle, Runner(bundle))
    assert tokens_by_key(alone.admit(Plan(admit=[entry(1, DecodingParams(max_new_tokens=8))]))) == {1: firsts[1]}
    alone.close()
