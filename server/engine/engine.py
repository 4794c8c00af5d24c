"""ModelEngine: one loaded model version, one decode loop, continuous batching.

The loop runs on a worker thread of its own: plan (scheduler), step (prefill, decode, choose, stop),
repeat. Graph calls never block the asyncio loop, and the worker never waits for it either: each
step's events are handed to the asyncio loop (`call_soon_threadsafe`), which delivers them to the
request streams while the next step already runs. A decode step's events are handed over once the
next step's decode call is entering ONNX Runtime on the decode thread: the event loop's Python then
runs beside the graph call, instead of holding the GIL when a thread needs it to start one. The
scheduler is shared by both threads under one lock, held only for bookkeeping, never during a step.
Requests enter through `submit` (generations, translations) and `feed` (sessions), validated once, here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from server.bundle import LoadedBundle
from server.decoding import FinishReason
from server.engine.config import EngineConfig
from server.engine.constraints import check_constraint
from server.engine.core import EngineCore, StepResult
from server.engine.prefix_cache import CacheMetrics, PrefixCache
from server.engine.requests import (
    Consumer,
    FeedRequest,
    FinishEvent,
    GenerationRequest,
    RequestStream,
    State,
    StepOutput,
    StreamTable,
    TranslationRequest,
    context_of,
)
from server.engine.runner import Runner
from server.engine.scheduler import Entry, Plan, Scheduler
from server.engine.tracking import DEADLINE_LABEL
from server.engine.validation import validate_feed, validate_request
from server.errors import DeadlineExceeded, SeqserveError, Unavailable
from server.metrics import Metrics

logger = logging.getLogger(__name__)


class ModelEngine:
    def __init__(self, bundle: LoadedBundle, config: EngineConfig | None = None, metrics: Metrics | None = None):
        self.bundle = bundle
        self.config = config = config if config is not None else EngineConfig()
        self.name = bundle.name
        self.version = bundle.version
        self.spec = bundle.spec
        self.kind = bundle.spec.kind  # a ModelKind, equal to "lm" or "seq2seq"
        self.runner = Runner(bundle, config.io_binding)
        self._scheduler = Scheduler(config)
        self._metrics = m = (metrics if metrics is not None else Metrics()).for_model(self.name)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, config.prefix_cache_stride, CacheMetrics(
            m.prefix_cache_hit_tokens_total, m.prefix_cache_hits, m.prefix_cache_misses, m.prefix_cache_bytes,
            m.prefix_cache_evictions_total))
        self._core = EngineCore(bundle, self.runner, config.limits.constraints, self.prefix_cache,
                                decode_thread=config.decode_thread)
        self._provider = bundle.providers[0] if bundle.providers else "none"
        self._lock = threading.Condition()  # guards the scheduler and the stop flag; wakes the worker
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._stop_at: float | None = None
        self._held: StepResult | None = None  # the worker's last decode phase, posted when the next call runs
        self._streams = StreamTable()  # the streams of `submit`: a consumer in this process
        self._consumers: dict[int, Consumer] = {}  # every consumer a request was submitted for, by id

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name=f"engine-{self.name}-v{self.version}", daemon=True)
        self._thread.start()
        self._metrics.set_info(self.version, self.spec.cell, self._provider)
        self._metrics.model_load_duration_seconds.observe(self.bundle.load_seconds)
        logger.info("serving %s v%d (%s, %s): providers asked %s, obtained %s", self.name, self.version,
                    self.kind, self.spec.cell, list(self.bundle.requested_providers),
                    list(self.bundle.providers))

    async def stop(self, grace_seconds: float = 30.0) -> None:
        """Refuse new work, let in-flight work finish for up to `grace_seconds`, then end the rest."""
        self._accepting = False
        if self._thread is None:
            return
        with self._lock:
            self._stop_at = time.monotonic() + grace_seconds
            self._lock.notify()
        # The worker ends between steps; awaiting it also runs every delivery it posted before ending.
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None
        leftover = self._scheduler.drain_all()
        was_admitted = [e for e in leftover if e.admitted_at is not None]
        self._count_out(was_admitted)
        self._metrics.queue_depth.dec(len(leftover) - len(was_admitted))
        outbox = _Outbox(self._consumers)
        for entry in leftover:
            self._end(outbox, entry, Unavailable(f"model {self.name} v{self.version} was unloaded before the "
                                                 "request finished; retry"), "cancelled")
        outbox.send()
        self._core.close()
        self._metrics.clear_info(self.version, self.spec.cell, self._provider)
        logger.info("stopped %s v%d", self.name, self.version)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (Unavailable); what was submitted still runs. `stop` follows."""
        self._accepting = False

    # --- entry points ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest | TranslationRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream.

        Raises InvalidArgument (bad parameters or input), FailedPrecondition (wrong kind of model),
        ResourceExhausted (queue full), Unavailable (engine stopping).
        """
        self._check_accepting()
        params, rows, input_tokens = validate_request(request, self.bundle, self.config)
        slot = self._scheduler.new_slot()
        stream = RequestStream(request.request_id, params, on_cancel=lambda: self._cancel(slot),
                               table=self._core.table, context_ids=context_of(request))
        self._streams.add(slot, stream)
        try:
            self._enqueue(self._entry(slot, request, params, rows, input_tokens, self._streams, slot))
        except BaseException:
            self._streams.discard(slot)
            raise
        return stream

    def submit_for(self, request: GenerationRequest | TranslationRequest, consumer: Consumer, key: int) -> int:
        """Queue a request whose outputs go to `consumer` under `key` (another process's streams); its slot,
        for `cancel`. Raises as `submit` does."""
        self._check_accepting()
        params, rows, input_tokens = validate_request(request, self.bundle, self.config)
        slot = self._scheduler.new_slot()
        self._enqueue(self._entry(slot, request, params, rows, input_tokens, consumer, key))
        return slot

    def cancel(self, slot: int) -> None:
        """Drop a request submitted with `submit_for` at the next step (its end still reaches its consumer)."""
        self._cancel(slot)

    def _entry(self, slot: int, request, params, rows: int, input_tokens: int, consumer: Consumer,
               key: int) -> Entry:
        self._consumers[consumer.consumer_id] = consumer
        return Entry(slot=slot, request=request, params=params, rows=rows, input_tokens=input_tokens,
                     enqueued_at=time.monotonic(), consumer=consumer, key=key, priority=request.priority)

    # --- what sessions use (server.sessions.port.SessionEngine) -------------------------------

    async def check_constraint(self, params, context_ids=()) -> None:
        """Compile `params.constraint` for this model off the event loop (see `server.engine.constraints`)."""
        spec = self.spec
        await check_constraint(params, self.bundle.tokenizer(spec.output_tokenizer_role), spec.vocab_size,
                               spec.special.eos, self.config.limits.constraints, context_ids)

    @property
    def max_input_tokens(self) -> int:
        """The most tokens one prompt, source or fed text may have (longer: INVALID_ARGUMENT)."""
        return self.config.limits.max_input_tokens

    def tokenizer(self, role: str):
        """The bundle's tokenizer for `role` ("text" of an LM; "source" or "target" of a translator)."""
        return self.bundle.tokenizer(role)

    def zero_state(self, rows: int = 1) -> State:
        """The recurrent state before any token, `rows` rows (batch first): where a session starts."""
        return self.runner.zero_state(rows)

    async def feed(self, state: State | None, token_ids: list[int], want_log_probs: bool = False, *,
                   next_token_id: int | None = None, deadline: float | None = None
                   ) -> tuple[State, np.ndarray | None]:
        """Advance a session's state by `token_ids` through the batched prefill (see `FeedRequest`).

        Any number of tokens: more than `max_input_tokens` go in pieces of that many, one after the
        other, so that one long feed never fills a step's prefill alone. The log-probs are the pieces'
        together (each piece's last one scored on the first token of the next).
        """
        ids = list(token_ids)
        size = self.config.limits.max_input_tokens
        if len(ids) <= size:
            return await self._feed_piece(state, ids, want_log_probs, next_token_id, deadline)
        scores = []
        for start in range(0, len(ids), size):
            following = ids[start + size] if start + size < len(ids) else next_token_id
            state, part = await self._feed_piece(state, ids[start : start + size], want_log_probs, following,
                                                 deadline)
            scores.append(part)
        return state, np.concatenate(scores) if want_log_probs else None

    async def park(self, state: State, last_token_id: int, finish: FinishEvent) -> tuple[State, list[int]]:
        """Where a session stands after a generation that started from (`state`, `last_token_id`) ended with
        `finish`: the state before the last token the generation chose, and every token it chose.

        The chosen tokens are the generated ones, plus a final <eos> when the model chose it (a matched stop
        string's tokens are generated ones); a generation cancelled before its first step chose none, and
        (`state`, []) comes back. The finish event's `final_state` is used when it has one (greedy and
        sampling with `return_final_state`); otherwise (beam search) the chosen tokens are fed.
        """
        eos = self.spec.special.eos
        chosen = list(finish.generated_ids)
        if finish.last_token_id == eos or (finish.final_state is None and finish.reason is FinishReason.EOS):
            chosen.append(eos)
        if not chosen:
            return state, []
        if finish.final_state is not None and finish.last_token_id == chosen[-1]:
            return finish.final_state, chosen
        state, _ = await self.feed(state, [last_token_id, *chosen[:-1]])
        return state, chosen

    async def _feed_piece(self, state: State | None, token_ids: list[int], want_log_probs: bool,
                          next_token_id: int | None, deadline: float | None) -> tuple[State, np.ndarray | None]:
        self._check_accepting()
        request = FeedRequest(state, token_ids, want_log_probs, next_token_id, deadline)
        validate_feed(request, self.bundle, self.config)
        slot = self._scheduler.new_slot()
        future = asyncio.get_running_loop().create_future()
        self._enqueue(Entry(slot=slot, request=request, params=None, rows=0, input_tokens=len(token_ids),
                            enqueued_at=time.monotonic(), future=future))
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel(slot)
            raise

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise Unavailable(f"model {self.name} v{self.version} is not serving (loading or shutting down)")

    def _enqueue(self, entry: Entry) -> None:
        with self._lock:  # counted under the lock, before the worker can plan it and count it out
            self._scheduler.add(entry)
            self._metrics.queue_depth.inc()
            self._lock.notify()

    def _cancel(self, slot: int) -> None:
        with self._lock:
            self._scheduler.cancel(slot)
            self._lock.notify()

    # --- the worker thread ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._scheduler.idle and self._stop_at is None:
                    self._lock.wait()
                stopping = self._stop_at is not None and (self._scheduler.idle or time.monotonic() >= self._stop_at)
                plan = None if stopping else self._scheduler.plan(time.monotonic())
            if plan is None:
                self._post_held()
                return
            self._count_plan(plan)
            # Two phases: rows leaving and joining (with the first tokens of the requests that joined),
            # handed to the event loop as soon as it is done; then the step of every row, whose events are
            # held until the next step's decode call has started (`_post_held`), so that the event loop's
            # work on them runs beside that call rather than holding the GIL when this thread needs it.
            admit = functools.partial(self._core.admit, plan, self._post_held)
            outcome = self._run_phase(admit, plan)
            if outcome == _OK:
                outcome = self._run_phase(self._core.decode, _NOTHING_PLANNED, hold=True)
                with self._lock:
                    idle = self._scheduler.idle
                if idle:  # no next step to hide the delivery behind
                    outcome = outcome if self._post_held() else _LOOP_GONE
            if outcome == _LOOP_GONE:
                return

    def _post_held(self) -> bool:
        """Post the held outcome of the last decode phase, if any; False if the event loop is gone."""
        held, self._held = self._held, None
        return held is None or self._post(_NOTHING_PLANNED, held, [], None)

    def _run_phase(self, phase: Callable[[], StepResult], plan: Plan, hold: bool = False) -> str:
        """Run one phase of a step and post its outcome (with what `plan` ended), or with `hold` keep it
        for `_post_held`: _OK, _FAILED (its requests were failed) or _LOOP_GONE (nobody is left to serve)."""
        try:
            result = phase()
        except Exception as error:  # a failed graph call must not end the loop
            logger.exception("%s v%d: a step failed; failing its requests", self.name, self.version)
            self._core.reset()
            with self._lock:
                failed = self._scheduler.end_admitted()
            self._count_out(failed)
            failure = SeqserveError(f"internal error while decoding: {error}")
            posted = self._post_held() and self._post(plan, StepResult(), failed, failure)
            return _FAILED if posted else _LOOP_GONE
        with self._lock:  # free the rows now, so the next plan can use them
            for entry, _ in result.finished:
                self._scheduler.finish(entry.slot)
            for entry, _, _ in result.feeds:
                self._scheduler.finish(entry.slot)
        self._count_step(result)
        if not (result.events or result.plain or result.feeds or result.dropped or plan.drop or plan.expired
                or plan.withdrawn):
            return _OK  # nothing to deliver: spare the event loop a wake-up
        if hold:
            self._held = result  # the decode phase ends nothing that a plan ended: its plan is empty
            return _OK
        return _OK if self._post(plan, result, [], None) else _LOOP_GONE

    def _post(self, plan: Plan, result: StepResult, failed: list[Entry], failure: SeqserveError | None) -> bool:
        """Hand a step's outcome to the asyncio loop; False if that loop is gone (nobody to serve)."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, plan, result, failed, failure)
        except RuntimeError:  # the event loop was closed without stopping this engine
            logger.warning("%s v%d: the event loop closed under a running engine; stopping it", self.name,
                           self.version)
            return False
        return True

    def _count_plan(self, plan: Plan) -> None:
        metrics = self._metrics
        now = time.monotonic()
        taken = len(plan.admit) + len(plan.withdrawn) + sum(1 for e in plan.expired if e.admitted_at is None)
        if taken:
            metrics.queue_depth.dec(taken)
        ended = [e for e in (*plan.drop, *plan.expired) if e.admitted_at is not None]
        rows_in = sum(e.rows for e in (*plan.admit, *plan.resume))
        rows_out = sum(e.rows for e in ended if e.parked_at is None) + sum(e.rows for e in plan.park)
        if rows_in != rows_out:
            metrics.active_rows.inc(rows_in - rows_out)
        parked = (sum(e.rows for e in plan.park) - sum(e.rows for e in plan.resume)
                  - sum(e.rows for e in ended if e.parked_at is not None))
        if parked:
            metrics.parked_rows.inc(parked)
        if plan.park:
            metrics.preemptions_total.inc(len(plan.park))
        for entry in plan.admit:
            metrics.queue_wait(entry.priority).observe(now - entry.enqueued_at)
        for entry in (*plan.drop, *plan.withdrawn):
            if not entry.is_feed:
                metrics.finished(FinishReason.CANCELLED.value)
        for entry in plan.expired:
            if not entry.is_feed:
                metrics.finished(DEADLINE_LABEL)

    def _count_step(self, result: StepResult) -> None:
        metrics = self._metrics
        if result.rows:
            metrics.batch_size.observe(result.rows)
            metrics.decode_step_duration_seconds.observe(result.decode_seconds)
        if result.prompt_tokens:
            metrics.prompt_tokens_total.inc(result.prompt_tokens)
        if result.prefill_tokens:
            metrics.prefill_tokens_total.inc(result.prefill_tokens)
        if result.generated_tokens:
            metrics.generated_tokens_total.inc(result.generated_tokens)
        metrics.count_constraints(result.constrained, result.mask_seconds)
        rows_out = 0
        for entry, reason in result.finished:
            rows_out += entry.rows
            metrics.finished(reason)
        if rows_out:
            metrics.active_rows.dec(rows_out)

    def _count_out(self, entries: list[Entry]) -> None:
        """Admitted entries ended without a plan (a failed step, a stop): out of the row gauges."""
        active = sum(e.rows for e in entries if e.parked_at is None)
        parked = sum(e.rows for e in entries if e.parked_at is not None)
        if active:
            self._metrics.active_rows.dec(active)
        if parked:
            self._metrics.parked_rows.dec(parked)

    # --- delivery, on the asyncio loop's thread -------------------------------------------------

    def _deliver(self, plan: Plan, result: StepResult, failed: list[Entry], failure: SeqserveError | None) -> None:
        """A step's outcome to its consumers (one hand-over each) and to the feeds' futures."""
        outbox = _Outbox(self._consumers)
        for entry in plan.withdrawn:
            self._end(outbox, entry, None)
        for entry in plan.expired:
            self._end(outbox, entry, DeadlineExceeded(f"request {entry.request_id} passed its deadline"))
        for entry in plan.drop:
            self._end(outbox, entry, result.dropped.get(entry.slot))
        for entry, state, log_probs in result.feeds:
            if not entry.future.done():
                entry.future.set_result((state, log_probs))
        for consumers, keys, tokens in result.plain:
            outbox.plain(consumers, keys, tokens)
        for entry, event in result.events:
            outbox.event(entry, event)
        for entry in failed:
            self._end(outbox, entry, failure, "error")
        outbox.send()

    def _end(self, outbox: _Outbox, entry: Entry, outcome: FinishEvent | BaseException | None,
             label: str | None = None) -> None:
        """Close an entry that did not finish on its own: a partial finish event, an error, or nothing."""
        if label is not None and not entry.is_feed:
            self._metrics.finished(label)
        if entry.future is not None:
            if not entry.future.done():
                if isinstance(outcome, BaseException):
                    entry.future.set_exception(outcome)
                else:
                    entry.future.cancel()
            return
        outbox.event(entry, outcome if outcome is not None else _cancelled_event(entry))


class _Outbox:
    """One delivery's outputs, gathered per consumer and handed over together: a consumer's plain tokens
    first (every part of them, in step order), then its other events in order."""

    def __init__(self, consumers: dict[int, Consumer]):
        self._consumers = consumers
        self._plain: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._events: dict[int, list] = {}

    def plain(self, consumers: np.ndarray, keys: np.ndarray, tokens: np.ndarray) -> None:
        self._plain.append((consumers, keys, tokens))

    def event(self, entry: Entry, item) -> None:
        self._events.setdefault(entry.consumer.consumer_id, []).append((entry.key, item))

    def send(self) -> None:
        outputs: dict[int, StepOutput] = {}
        if self._plain:
            parts = self._plain
            consumers, keys, tokens = (np.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
                                       for i in range(3))
            first = consumers[0]
            if (consumers == first).all():  # the usual case: every row's consumer is the same
                outputs[int(first)] = StepOutput(keys, tokens, [])
            else:
                order = np.argsort(consumers, kind="stable")
                ids, starts = np.unique(consumers[order], return_index=True)
                for cid, part in zip(ids.tolist(), np.split(order, starts[1:]), strict=True):
                    outputs[cid] = StepOutput(keys[part], tokens[part], [])
        for cid, events in self._events.items():
            output = outputs.get(cid)
            if output is None:
                outputs[cid] = StepOutput(_NO_IDS, _NO_IDS, events)
            else:
                output.events = events
        for cid, output in outputs.items():
            self._consumers[cid].deliver(output)


_NO_IDS = np.zeros(0, dtype=np.int64)
_NOTHING_PLANNED = Plan()  # the decode phase's: what the step's plan ended went out with its admit phase
_OK, _FAILED, _LOOP_GONE = "ok", "failed", "loop gone"


def _cancelled_event(entry: Entry) -> FinishEvent:
    request = entry.request
    prompt = request.prompt_ids if isinstance(request, GenerationRequest) else request.source_ids
    return FinishEvent(reason=FinishReason.CANCELLED, hypotheses=[], text="", generated_ids=[], final_state=None,
                       prompt_tokens=len(prompt), texts=[])
