"""One engine step, synchronous, run by the engine's worker thread, in two phases.

`admit`: rows of cancelled or expired requests leave; newly admitted requests are prefilled (LM) or
encoded (seq2seq) together in one call, and the greedy and sampling ones among them choose their first
token at once: an LM's from the prefill's log-probs after the prompt, a seq2seq model's from one decoder
step of the joining rows alone (a few rows, a fraction of a full step). Their first token goes out
before the step of everyone else, not after it (time to first token). Meanwhile the rows already in
the batch run their decode call on a second thread (ONNX Runtime releases the GIL), so a prefill no
longer stalls everyone's step when a core is free.

`decode`: every active row advances in one decode call (or completes the one started during `admit`);
choose, stop, emit; then the admitted rows join the batch (beam requests start with the next step).

The per-step work on rows is a handful of numpy calls whatever their number. A plain row's token
(greedy or sampling, no stop strings, log-probs, alternatives or attention; the common case) becomes
its text by a table lookup (`TokenTable`) and its event on the event loop's thread (`StepResult.tokens`);
Python loops run only for the other rows, for a character split over tokens, and for requests that end.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.bundle import LoadedBundle
from server.decoding import BeamSearch, FinishReason, RowParams, TokenChooser
from server.decoding.matching import AllowedTokens, ConstraintRows, ConstraintSettings, allowed_tokens
from server.engine.batch import CHOOSER_GROUP, ChooserRows, DecodeBatch, take_rows
from server.engine.beams import BeamGroupStep, step_beam_group
from server.engine.constraints import compiler_for
from server.engine.requests import Event, FeedRequest, GenerationRequest, State, TranslationRequest
from server.engine.runner import Runner
from server.engine.scheduler import Entry, Plan
from server.engine.tracking import Tracked
from server.text.stream import TextStream
from server.text.table import TokenTable


@dataclass
class StepResult:
    """What a step produced, for the event loop to deliver and count."""

    events: list[tuple[Entry, Event]] = field(default_factory=list)  # in the order they happened
    # Plain rows' tokens, as arrays: (consumer id, key, token) per row. Their text is made where the
    # consumer takes them (`RequestStream`); the step's events of the same request come after them.
    plain: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    finished: list[tuple[Entry, str]] = field(default_factory=list)  # requests that ended, and why
    dropped: dict[int, Event] = field(default_factory=dict)  # slot -> partial finish event (cancelled)
    feeds: list[tuple[Entry, State, np.ndarray | None]] = field(default_factory=list)
    rows: int = 0  # rows of the decode call (0: none ran)
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    constrained: list[str] = field(default_factory=list)  # the constraint kind of every request admitted with one
    mask_seconds: float = 0.0  # spent working out the constrained rows' allowed tokens (0: none had to)


class EngineCore:
    """The batch, the decoding state of its rows, and the step that advances them."""

    def __init__(self, bundle: LoadedBundle, runner: Runner, constraints: ConstraintSettings | None = None):
        spec = bundle.spec
        self.runner = runner
        self.is_lm = spec.is_lm
        self.eos_id = spec.special.eos
        self.bos_id = spec.special.bos
        self.vocab_size = spec.vocab_size
        self.tokenizer = bundle.tokenizer(spec.output_tokenizer_role)
        self.table = TokenTable.build(self.tokenizer, self.vocab_size)  # None: decode windows instead
        self.chooser = TokenChooser(self.eos_id)
        self.constraint_settings = constraints or ConstraintSettings()
        self._decoder: ThreadPoolExecutor | None = None  # runs the batch's decode call during an admission
        self._in_flight: Future | None = None
        self._joining: _Joining | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every row (after a failed step, or to start over)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            concurrent.futures.wait([in_flight])  # a graph call cannot be interrupted; its result is dropped
        self._joining = None
        self._masks: list[AllowedTokens | None] | None = None  # the batch's, worked out during its decode call
        self.batch = DecodeBatch.empty(self.runner.state_shapes, self.runner.memory_size)
        self.choosers = ChooserRows.empty(self.vocab_size)
        self.beams: dict[int, BeamSearch] = {}
        self.tracked: dict[int, Tracked] = {}

    def close(self) -> None:
        """Forget every row and end the decode thread."""
        self.reset()
        if self._decoder is not None:
            self._decoder.shutdown()
            self._decoder = None

    def admit(self, plan: Plan, decode_started: Callable[[], None] | None = None) -> StepResult:
        """Rows leave; the admitted requests are prefilled or encoded, and the greedy/sampling ones choose
        their first token. Meanwhile (on the decode thread) the rows already in the batch run their step,
        which `decode` completes; the admitted rows join the batch after it.

        `decode_started` is called once the batch's decode call is under way (at once if the batch is
        empty), before any prefill: work that needs the GIL for a while (delivering the last step's
        events) then overlaps the graph call instead of delaying its start.
        """
        result = StepResult()
        dropped = plan.dropped_slots()
        if dropped:
            self._drop(dropped, result)
        if len(self.batch) and (plan.admit or decode_started is not None):
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(1, thread_name_prefix="engine-decode")
            calling = threading.Event()
            self._in_flight = self._decoder.submit(self._timed_decode, self.batch, calling)
            if decode_started is not None:
                # Wait until the decode thread is about to enter the graph call (where it lets go of the GIL):
                # the event loop woken now cannot hold up the start of the call.
                calling.wait()
        if decode_started is not None:
            decode_started()
        if self._in_flight is not None:  # the constrained rows' masks, while their decode call runs
            self._masks = self._batch_masks(result)
        if plan.admit:
            self._admit(plan.admit, result)
        return result

    def decode(self) -> StepResult:
        """One token for every row in the batch (nothing if it is empty); then the admitted rows join."""
        result = StepResult()
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None or len(self.batch):
            outputs = in_flight.result() if in_flight is not None else self._timed_decode(self.batch)
            log_probs, state, attention, result.decode_seconds = outputs
            result.rows = len(self.batch)
            self._advance(log_probs, state, attention, result)
        self._join()
        return result

    def _timed_decode(self, batch: DecodeBatch, calling: threading.Event | None = None
                      ) -> tuple[np.ndarray, State, np.ndarray | None, float]:
        if calling is not None:
            calling.set()
        started = time.perf_counter()
        log_probs, state, attention = self.runner.decode(batch)
        return log_probs, state, attention, time.perf_counter() - started

    # --- rows leave -----------------------------------------------------------------------------

    def _drop(self, slots: list[int], result: StepResult) -> None:
        leaving = [slot for slot in slots if slot in self.tracked]
        if not leaving:
            return
        parked = self._parked(leaving)
        keep = ~np.isin(self.batch.owners, np.array(leaving, dtype=np.int64))
        chooser_rows = self.batch.groups == CHOOSER_GROUP
        for row in np.flatnonzero(~keep[chooser_rows]).tolist():  # per leaving request: its tokens so far
            self._settle(self.choosers, row, drop_last=False)
        self.choosers = self.choosers.filter(keep[chooser_rows])
        for beam in self.beams.values():
            beam.leave(leaving)
        self.batch = self.batch.filter(keep)
        for slot in leaving:
            state, last_token_id = parked.get(slot, (None, None))
            result.dropped[slot] = self.tracked.pop(slot).finish_event(FinishReason.CANCELLED, state, last_token_id)

    def _parked(self, slots: list[int]) -> dict[int, tuple[State, int]]:
        """Leaving greedy/sampling rows that asked for their final state: (state, token) as a finish
        would give them: the row's state before its last chosen token, and that token (a row in the
        batch has chosen at least one token, none of them <eos>). Per leaving request, not per row."""
        parked = {}
        for slot in slots:
            tracked = self.tracked[slot]
            if tracked.params.strategy == "beam" or not tracked.wants_final_state:
                continue
            (row,) = np.flatnonzero(self.batch.owners == slot)
            parked[slot] = (tuple(s[row : row + 1].copy() for s in self.batch.state), int(self.batch.tokens[row]))
        return parked

    # --- rows join ------------------------------------------------------------------------------

    def _admit(self, entries: list[Entry], result: StepResult) -> None:
        feeds = [e for e in entries if e.is_feed]
        requests = [e for e in entries if not e.is_feed]
        result.prompt_tokens += sum(e.input_tokens for e in entries)
        if self.is_lm:
            starts, first_log_probs = self._prefill(requests, feeds, result)
            tokens = np.array([e.request.prompt_ids[-1] for e in requests], dtype=np.int64)
            memory = mask = None
        elif requests:
            memory, mask, starts = self.runner.encode([e.request.source_ids for e in requests])
            tokens = np.full(len(requests), self.bos_id, dtype=np.int64)
        if not requests:
            return
        repeats = np.array([e.rows for e in requests], dtype=np.int64)
        groups = [CHOOSER_GROUP if e.params.strategy != "beam" else e.params.beam_size for e in requests]
        arrivals = DecodeBatch(
            state=tuple(np.repeat(s, repeats, axis=0) for s in starts),
            tokens=np.repeat(tokens, repeats),
            owners=np.repeat(np.array([e.slot for e in requests], dtype=np.int64), repeats),
            groups=np.repeat(np.array(groups, dtype=np.int64), repeats),
            memory=None if memory is None else np.repeat(memory, repeats, axis=0),
            mask=None if mask is None else np.repeat(mask, repeats, axis=0),
        )
        histories = [self._history(e) for e in requests]
        for entry, history in zip(requests, histories, strict=True):
            self.tracked[entry.slot] = self._track(entry, history)
        # The batch, its choosers and beam groups change only in `_join`: the batch's step may be running.
        joining = self._joining = _Joining()
        chosen = [i for i, g in enumerate(groups) if g == CHOOSER_GROUP]
        if chosen:
            rows = RowParams.concatenate([RowParams.from_params(requests[i].params) for i in chosen])
            tracked = [self.tracked[requests[i].slot] for i in chosen]
            part = ChooserRows.start(rows, [histories[i] for i in chosen], self.vocab_size, tracked,
                                     plain=[t.text is None for t in tracked], keys=[t.entry.key for t in tracked],
                                     consumers=[t.entry.consumer.consumer_id for t in tracked],
                                     constraints=self._constraint_rows([requests[i] for i in chosen],
                                                                       [histories[i] for i in chosen], result))
            first = arrivals.filter(arrivals.groups == CHOOSER_GROUP)  # one row per request
            if self.is_lm:  # prefilled through the whole prompt: the first token's log-probs are there
                log_probs, state, attention = first_log_probs[chosen], first.state, None
            else:  # one decoder step of the joining rows alone
                log_probs, state, attention = self.runner.decode(first)
            (allowed,) = self._allowed([part.constraints], result)
            joining.choosers, keep, tokens = self._choose(part, np.arange(len(first)), log_probs, state, attention,
                                                          result, allowed)
            kept = np.flatnonzero(keep)
            joining.rows.append(first.advance(state, kept, tokens[kept]))
        beam_sizes = sorted({g for g in groups if g != CHOOSER_GROUP})
        for size in beam_sizes:
            members = [i for i, g in enumerate(groups) if g == size]
            joining.beams.append((size, [requests[i].slot for i in members], [requests[i].params for i in members],
                                  [histories[i] for i in members] if self.is_lm else None,
                                  self._constraint_rows([requests[i] for i in members], [histories[i] for i in members],
                                                        result, repeats=size)))
        if beam_sizes:
            joining.rows.append(arrivals.filter(arrivals.groups != CHOOSER_GROUP))

    def _join(self) -> None:
        """The rows admitted by the last `admit` join the batch (after its step), in batch order: the
        greedy/sampling rows after the batch's, then the beam rows after their groups'."""
        joining, self._joining = self._joining, None
        if joining is None:
            return
        if joining.choosers is not None:
            self.choosers = ChooserRows.concatenate([self.choosers, joining.choosers])
        for size, slots, params, histories, constraints in joining.beams:
            beam = self.beams.get(size)
            if beam is None:
                beam = self.beams[size] = BeamSearch(size, self.vocab_size, self.eos_id)
            beam.join(slots, params, histories, constraints)
        self.batch = DecodeBatch.concatenate([self.batch, *joining.rows])

    def _prefill(self, requests: list[Entry], feeds: list[Entry], result: StepResult
                 ) -> tuple[State, np.ndarray | None]:
        """Prefill every admitted prompt and every feed in one call.

        A greedy or sampling request is fed its whole prompt: its first token is chosen from the log-probs
        after it. A beam request is fed all but its last token, which its beams start from at the next
        step. Returns each request's starting state and the log-probs after each greedy/sampling request's
        prompt ([requests, V]; beam requests' rows unset), or None if there are none.
        """
        starts = [self._initial(e.request.initial_state) for e in requests]
        choosing = [e.params.strategy != "beam" for e in requests]
        jobs = [(i, e.request.prompt_ids if choose else e.request.prompt_ids[:-1], starts[i])
                for i, (e, choose) in enumerate(zip(requests, choosing, strict=True))]
        jobs = [job for job in jobs if len(job[1])]
        jobs += [(None, e.request.token_ids, self._initial(e.request.state)) for e in feeds]
        first_log_probs = np.empty((len(requests), self.vocab_size), dtype=np.float32) if any(choosing) else None
        if jobs:
            state_in = tuple(np.concatenate(parts) for parts in zip(*(s for _, _, s in jobs), strict=True))
            want = any(e.request.want_log_probs for e in feeds)
            state_out, log_probs, last = self.runner.prefill([seq for _, seq, _ in jobs], state_in, want,
                                                             want_last=first_log_probs is not None)
            for row, (index, _, _) in enumerate(jobs):
                if index is not None:
                    starts[index] = tuple(s[row : row + 1] for s in state_out)
                    if choosing[index]:
                        first_log_probs[index] = last[row]
            first_feed = len(jobs) - len(feeds)
            for row, entry in enumerate(feeds, start=first_feed):
                state = tuple(s[row : row + 1].copy() for s in state_out)
                scores = _feed_log_probs(entry.request, log_probs[row]) if entry.request.want_log_probs else None
                result.feeds.append((entry, state, scores))
        if not requests:
            return (), None
        return tuple(np.concatenate(parts) for parts in zip(*starts, strict=True)), first_log_probs

    def _initial(self, state: State | None) -> State:
        if state is None:
            return self.runner.zero_state(1)
        return tuple(np.ascontiguousarray(s, dtype=np.float32) for s in state)

    def _history(self, entry: Entry) -> list[int]:
        request = entry.request
        if not isinstance(request, GenerationRequest):
            return []
        return list(request.history_ids if request.history_ids is not None else request.prompt_ids)

    def _track(self, entry: Entry, history: list[int]) -> Tracked:
        request = entry.request
        source_length = 0 if self.is_lm else len(request.source_ids)
        params = entry.params
        plain = (self.table is not None and params.strategy != "beam" and not params.stop
                 and not params.return_log_probs and not params.top_logprobs
                 and not (isinstance(request, TranslationRequest) and request.return_attention))
        tracked = Tracked(entry=entry, text=None if plain else self._text_stream(entry, history),
                          prompt_tokens=entry.input_tokens, source_length=source_length)
        if plain:
            tracked.table, tracked.after_text = self.table, self.table.speaks(history)
        if tracked.wants_attention:
            if entry.params.strategy == "beam":
                tracked.beam_trail = np.zeros((entry.rows, 0, source_length), dtype=np.float32)
            else:
                tracked.attention = []
        return tracked

    def _text_stream(self, entry: Entry, history: list[int]) -> TextStream:
        return TextStream(self.tokenizer, entry.params.stop, context_ids=history, table=self.table)

    def _constraint_rows(self, entries: list[Entry], histories: list[list[int]], result: StepResult,
                         repeats: int = 1) -> ConstraintRows | None:
        """A matcher of its own for each of the `repeats` rows of every entry that carries a constraint (None:
        none does). Compiled when the request was submitted, so this is the cache's copy."""
        constrained = [i for i, e in enumerate(entries) if e.params.constraint is not None]
        if not constrained:
            return None
        compiler = compiler_for(self.tokenizer, self.vocab_size, self.eos_id, self.constraint_settings)
        matchers: list = [None] * (len(entries) * repeats)
        for i in constrained:  # per joining request
            constraint = entries[i].params.constraint
            lead = compiler.lead(spoken=self.table is not None and self.table.speaks(histories[i]))
            matchers[i * repeats : (i + 1) * repeats] = [compiler.matcher(constraint, lead) for _ in range(repeats)]
            result.constrained.append(constraint.kind)
        return ConstraintRows.of(matchers)

    def _batch_masks(self, result: StepResult) -> list[AllowedTokens | None]:
        """The allowed tokens of the batch's greedy/sampling rows, then of each beam group that has rows."""
        groups = [beam for beam in self.beams.values() if len(beam)]
        return self._allowed([self.choosers.constraints, *(beam.constraints for beam in groups)], result)

    def _allowed(self, parts: list[ConstraintRows], result: StepResult) -> list[AllowedTokens | None]:
        """The allowed tokens of the constrained rows of `parts`, all worked out together (timed)."""
        if not any(part.count for part in parts):
            return [None] * len(parts)
        started = time.perf_counter()
        allowed = allowed_tokens(parts, self.vocab_size, self.eos_id, self.constraint_settings.mask_threads)
        result.mask_seconds += time.perf_counter() - started
        return allowed

    # --- one step of every row ------------------------------------------------------------------

    def _advance(self, log_probs: np.ndarray, state: State, attention: np.ndarray | None,
                 result: StepResult) -> None:
        batch = self.batch
        index_parts, token_parts, memory_parts = [], [], []
        groups = [beam for beam in self.beams.values() if len(beam)]
        masks, self._masks = self._masks, None
        allowed, *beam_allowed = masks if masks is not None else self._batch_masks(result)
        chooser_rows = np.flatnonzero(batch.groups == CHOOSER_GROUP)
        if chooser_rows.size:
            self.choosers, keep, tokens = self._choose(self.choosers, chooser_rows, log_probs, state, attention,
                                                       result, allowed)
            index_parts.append(chooser_rows[keep])
            memory_parts.append(chooser_rows[keep])
            token_parts.append(tokens[keep])
        for beam, beam_mask in zip(groups, beam_allowed, strict=True):
            rows = np.flatnonzero(batch.groups == beam.beam_size)
            group = step_beam_group(beam, rows, log_probs, attention, self.tracked, beam_mask)
            self._emit_beams(group, result)
            index_parts.append(group.index)
            memory_parts.append(group.memory_index)
            token_parts.append(group.tokens)
        self.batch = batch.advance(state, np.concatenate(index_parts), np.concatenate(token_parts),
                                   np.concatenate(memory_parts))

    def _choose(self, choosers: ChooserRows, rows: np.ndarray, log_probs: np.ndarray, state: State,
                attention: np.ndarray | None, result: StepResult, allowed: AllowedTokens | None = None
                ) -> tuple[ChooserRows, np.ndarray, np.ndarray]:
        """Greedy/sampling rows choose a token each. `rows` (ascending) index their log-probs, state (after
        the step) and attention in the step's arrays, in the order of `choosers`; `allowed`: the tokens of
        its constrained rows. Returns the choosers of the rows that go on, which rows go on (bool [N]), and
        every row's token."""
        choice = self.chooser.choose(take_rows(log_probs, rows), choosers.rows, choosers.history, choosers.generated,
                                     allowed)
        tokens = choice.tokens
        is_eos = tokens == self.eos_id
        at_limit = choosers.generated + 1 >= choosers.rows.max_new_tokens
        result.generated_tokens += int((~is_eos).sum())
        choosers.advance(tokens, choice.log_probs)
        ending = is_eos | at_limit
        choosers.constraints.consume(tokens, live=~ending)
        keep = ~ending
        plain = choosers.plain
        others = np.flatnonzero(~plain)
        if len(others) < len(plain):
            # Plain rows: every token but <eos> goes out as (consumer, key, token), text made by the consumer.
            out = np.flatnonzero(plain & ~is_eos)
            if out.size:
                result.plain.append((choosers.consumers[out], choosers.keys[out], tokens[out]))
            for i in np.flatnonzero(plain & ending).tolist():  # per request that ends
                reason = FinishReason.EOS if is_eos[i] else FinishReason.LENGTH
                self._finish(choosers, i, reason, int(tokens[i]), rows, state, result)
        if others.size:
            chosen, scores = tokens[others].tolist(), choice.log_probs[others].tolist()
            for i, token, score in zip(others.tolist(), chosen, scores, strict=True):  # rows with stop strings etc.
                tracked = choosers.tracked[i]
                if tracked.attention is not None:
                    tracked.attention.append(attention[rows[i], : tracked.source_length].copy())
                event, reason = tracked.on_token(token, score, bool(is_eos[i]), bool(at_limit[i]),
                                                 _alternatives(choice.alternatives, i, tracked.params.top_logprobs))
                if event is not None:
                    result.events.append((tracked.entry, event))
                if reason is not None:
                    keep[i] = False
                    self._finish(choosers, i, reason, token, rows, state, result)
        return (choosers.filter(keep) if not keep.all() else choosers), keep, tokens

    def _settle(self, choosers: ChooserRows, row: int, drop_last: bool) -> Tracked:
        """Copy a leaving row's tokens and summed log-prob from the columns into its Tracked."""
        tracked = choosers.tracked[row]
        tracked.generated = choosers.generated_ids(row, drop_last)
        tracked.log_prob = float(choosers.log_prob[row])
        return tracked

    def _finish(self, choosers: ChooserRows, row: int, reason: FinishReason, token: int, rows: np.ndarray,
                state: State, result: StepResult) -> None:
        """Row `row` of `choosers` (batch row `rows[row]`) ended on `token`: its finish event."""
        tracked = self._settle(choosers, row, drop_last=token == self.eos_id)
        final_state = None
        if tracked.wants_final_state:
            final_state = tuple(s[rows[row] : rows[row] + 1].copy() for s in state)
        result.events.append((tracked.entry, tracked.finish_event(reason, final_state, token)))
        result.finished.append((tracked.entry, reason.value))
        del self.tracked[tracked.entry.slot]

    def _emit_beams(self, group: BeamGroupStep, result: StepResult) -> None:
        for slot, hypotheses in group.done.items():  # per finished request
            tracked = self.tracked.pop(slot)
            history = self._history(tracked.entry)
            token_event, finish = tracked.beam_events(hypotheses,
                                                      lambda e=tracked.entry, h=history: self._text_stream(e, h))
            result.generated_tokens += len(finish.generated_ids)
            result.events.append((tracked.entry, token_event))
            result.events.append((tracked.entry, finish))
            result.finished.append((tracked.entry, finish.reason.value))


@dataclass
class _Joining:
    """What an admission adds to the batch once the batch's step is done."""

    rows: list[DecodeBatch] = field(default_factory=list)  # greedy/sampling rows (first token chosen), beam rows
    choosers: ChooserRows | None = None  # the greedy/sampling rows' that go on
    beams: list[tuple] = field(default_factory=list)  # (beam size, slots, params, histories) per group joined


def _alternatives(alternatives, row: int, count: int) -> list[tuple[int, float]] | None:
    if alternatives is None or count == 0:
        return None
    ids = alternatives.token_ids[row, :count].tolist()
    values = alternatives.log_probs[row, :count].tolist()
    return list(zip(ids, values, strict=True))


def _feed_log_probs(request: FeedRequest, log_probs: np.ndarray) -> np.ndarray:
    """log_probs[T, V] of one fed row -> the log-prob of each token after a fed token (module FeedRequest)."""
    following = list(request.token_ids[1:])
    if request.next_token_id is not None:
        following.append(request.next_token_id)
    positions = np.arange(len(following))
    return log_probs[positions, np.array(following, dtype=np.int64)].astype(np.float64)
