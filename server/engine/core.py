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

A prompt fed from the zero state starts from the longest prefix whose state the model version's
`PrefixCache` holds, and leaves the states at its stops there (`_prefill`). Rows that a higher-priority
request displaces are parked: set aside with their state, next token and decoding columns (history, tokens
generated, summed log-prob, sampling step, text state), and joined again later as they were (`_park`,
`_resume`), so no token is computed twice and no output changes.

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
from server.engine.prefix_cache import PrefixCache, prefill_stops
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
    prefill_tokens: int = 0  # of the prompt tokens, those the prefill or encoder computed (cache hits not)
    generated_tokens: int = 0
    constrained: list[str] = field(default_factory=list)  # the constraint kind of every request admitted with one
    mask_seconds: float = 0.0  # spent working out the constrained rows' allowed tokens (0: none had to)


class EngineCore:
    """The batch, the decoding state of its rows, and the step that advances them."""

    def __init__(self, bundle: LoadedBundle, runner: Runner, constraints: ConstraintSettings | None = None,
                 prefix_cache: PrefixCache | None = None, decode_thread: bool = True):
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
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        # The batch's decode call runs on a thread of its own beside an admission's prefill and the delivery
        # of the last step's events (`decode_thread`); without it, on the worker, after them.
        self.decode_thread = decode_thread
        self._decoder: ThreadPoolExecutor | None = None
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
        self.tracked: dict[int, Tracked] = {}  # running and parked requests
        # Rows set aside by `_park`: greedy/sampling rows only, so the two stay aligned row for row.
        self.parked_batch = DecodeBatch.empty(self.runner.state_shapes, self.runner.memory_size)
        self.parked_choosers = ChooserRows.empty(self.vocab_size)

    def close(self) -> None:
        """Forget every row and every cached prefix, and end the decode thread."""
        self.reset()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
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
        if plan.park:
            self._park([e.slot for e in plan.park])
        if len(self.batch) and self.decode_thread and (plan.admit or decode_started is not None):
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
        if plan.resume:
            self._resume([e.slot for e in plan.resume])
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
        final_states = self._final_states(leaving)
        gone = np.array(leaving, dtype=np.int64)
        self.batch, self.choosers = self._without(self.batch, self.choosers, gone)
        if len(self.parked_batch):
            self.parked_batch, self.parked_choosers = self._without(self.parked_batch, self.parked_choosers, gone)
        for beam in self.beams.values():
            beam.leave(leaving)
        for slot in leaving:
            state, last_token_id = final_states.get(slot, (None, None))
            result.dropped[slot] = self.tracked.pop(slot).finish_event(FinishReason.CANCELLED, state, last_token_id)

    def _without(self, batch: DecodeBatch, choosers: ChooserRows, gone: np.ndarray
                 ) -> tuple[DecodeBatch, ChooserRows]:
        """`batch` and its `choosers` without the rows of the requests `gone` (their tokens so far settled)."""
        keep = ~np.isin(batch.owners, gone)
        chooser_rows = batch.groups == CHOOSER_GROUP
        for row in np.flatnonzero(~keep[chooser_rows]).tolist():  # per leaving request: its tokens so far
            self._settle(choosers, row, drop_last=False)
        return batch.filter(keep), choosers.filter(keep[chooser_rows])

    def _final_states(self, slots: list[int]) -> dict[int, tuple[State, int]]:
        """Leaving greedy/sampling rows that asked for their final state: (state, token) as a finish
        would give them: the row's state before its last chosen token, and that token (a row in the
        batch, or parked, has chosen at least one token, none of them <eos>). Per leaving request, not per
        row."""
        final_states = {}
        for slot in slots:
            tracked = self.tracked[slot]
            if tracked.params.strategy == "beam" or not tracked.wants_final_state:
                continue
            for batch in (self.batch, self.parked_batch):
                rows = np.flatnonzero(batch.owners == slot)
                if rows.size:
                    row = int(rows[0])
                    final_states[slot] = (tuple(s[row : row + 1].copy() for s in batch.state), int(batch.tokens[row]))
                    break
        return final_states

    # --- rows step aside for a higher priority, and come back ------------------------------------

    def _park(self, slots: list[int]) -> None:
        """The rows of `slots` (greedy/sampling requests) leave the batch with all they need to go on: their
        state, the token they feed next and their decoding columns. Before the step's decode call starts."""
        leaving = np.isin(self.batch.owners, np.array(slots, dtype=np.int64))
        moving = leaving[self.batch.groups == CHOOSER_GROUP]
        self.parked_batch = DecodeBatch.concatenate([self.parked_batch, self.batch.filter(np.flatnonzero(leaving))])
        self.parked_choosers = ChooserRows.concatenate([self.parked_choosers,
                                                        self.choosers.filter(np.flatnonzero(moving))])
        self.batch = self.batch.filter(~leaving)
        self.choosers = self.choosers.filter(~moving)

    def _resume(self, slots: list[int]) -> None:
        """Parked rows of `slots` join the batch after this step, as they were when they left."""
        back = np.isin(self.parked_batch.owners, np.array(slots, dtype=np.int64))
        rows, choosers = self.parked_batch.filter(np.flatnonzero(back)), self.parked_choosers.filter(back)
        self.parked_batch, self.parked_choosers = self.parked_batch.filter(~back), self.parked_choosers.filter(~back)
        joining = self._joining
        if joining is None:
            joining = self._joining = _Joining()
        joining.rows.insert(0, rows)  # the first greedy/sampling rows that join, in both lists
        joining.choosers = choosers if joining.choosers is None else ChooserRows.concatenate([choosers,
                                                                                              joining.choosers])

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
            result.prefill_tokens += sum(e.input_tokens for e in requests)
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
        """Prefill every admitted prompt and every feed together.

        A greedy or sampling request is fed its whole prompt: its first token is chosen from the log-probs
        after it. A beam request is fed all but its last token, which its beams start from at the next
        step. What starts from the zero state starts from the deepest state the prefix cache holds on its
        path instead, and stops where a state is worth keeping (`_stops`); every row's next piece goes into
        one call, so a prompt without stops is one call as before. Returns each request's starting state
        and the log-probs after each greedy/sampling request's prompt ([requests, V]; beam requests' rows
        unset), or None if there are none.
        """
        choosing = [e.params.strategy != "beam" for e in requests]
        jobs = []
        for index, (entry, choose) in enumerate(zip(requests, choosing, strict=True)):
            request = entry.request
            jobs.append(_Fill(request.prompt_ids if choose else request.prompt_ids[:-1],
                              self._initial(request.initial_state), index=index, want_last=choose,
                              cacheable=request.initial_state is None))
        for entry in feeds:
            request = entry.request
            jobs.append(_Fill(request.token_ids, self._initial(request.state), entry=entry,
                              want_log_probs=request.want_log_probs,
                              cacheable=request.state is None and not request.want_log_probs))
        for job in jobs:
            self._stops(job)
        self._fill(jobs, result)
        first_log_probs = np.empty((len(requests), self.vocab_size), dtype=np.float32) if any(choosing) else None
        starts: list[State] = [()] * len(requests)
        for job in jobs:
            if job.entry is None:
                starts[job.index] = job.state
                if job.want_last:
                    first_log_probs[job.index] = job.last
                continue
            request = job.entry.request
            scores = _feed_log_probs(request, job.log_probs) if request.want_log_probs else None
            result.feeds.append((job.entry, tuple(s.copy() for s in job.state), scores))
        if not requests:
            return (), None
        return tuple(np.concatenate(parts) for parts in zip(*starts, strict=True)), first_log_probs

    def _stops(self, job: _Fill) -> None:
        """Where `job` starts (the longest cached prefix of what it feeds from the zero state) and where it
        stops to keep a state: every `stride` tokens, where it leaves the paths already cached, and the end.
        A request that chooses its first token also stops before its last token (the sessions' form, that
        token pending, which an identical prompt resumes from) when its whole prompt is already on a path
        of the tree (a repeat): a prompt seen for the first time pays no extra call for it."""
        length, cache = len(job.tokens), self.prefix_cache
        if not length:
            return
        if cache is None or not job.cacheable:
            job.stops = [length]
            return
        job.key = tuple(job.tokens)
        hit = cache.lookup(job.key, length - 1 if job.want_last else length)
        if hit.state is not None:
            job.state, job.position = hit.state, hit.depth
        extra = [length - 1] if job.want_last and hit.shared == length else []
        if hit.shared - hit.depth >= cache.min_branch:
            extra.append(hit.shared)
        job.stops = prefill_stops(length, job.position, cache.stride, extra)

    def _fill(self, jobs: list[_Fill], result: StepResult) -> None:
        """Run every job's pieces, one call per round (each job's next piece in it), keeping the states at
        cacheable stops; each job ends with its state (and its last log-probs or all log-probs if asked)."""
        running = [job for job in jobs if job.stops]
        while running:
            ends = [job.next + 1 == len(job.stops) for job in running]
            pieces = [job.tokens[job.position : job.stops[job.next]] for job in running]
            state_in = tuple(np.concatenate(parts) for parts in zip(*(job.state for job in running), strict=True))
            want_last = any(job.want_last and end for job, end in zip(running, ends, strict=True))
            want_log_probs = any(job.want_log_probs for job in running)  # such jobs have one piece
            state_out, log_probs, last = self.runner.prefill(pieces, state_in, want_log_probs, want_last=want_last)
            result.prefill_tokens += sum(len(piece) for piece in pieces)
            for row, (job, end) in enumerate(zip(running, ends, strict=True)):
                job.state = tuple(s[row : row + 1] for s in state_out)
                job.position = job.stops[job.next]
                job.next += 1
                if job.key is not None:
                    self.prefix_cache.insert(job.key[: job.position], job.state)
                if end and job.want_last:
                    job.last = last[row]
                if end and job.want_log_probs:
                    job.log_probs = log_probs[row]
            running = [job for job in running if job.next < len(job.stops)]

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


@dataclass(eq=False)
class _Fill:
    """What one prompt or feed needs from the prefill, and how far it got."""

    tokens: list[int]  # what it feeds, from `state`
    state: State  # the state after tokens[:position]
    index: int | None = None  # a request: its place among the admitted requests
    entry: Entry | None = None  # a feed
    want_last: bool = False  # the log-probs after the last token (a greedy/sampling request's first token)
    want_log_probs: bool = False  # the log-probs after every token (a feed that asked)
    cacheable: bool = False  # it starts from the zero state: the prefix cache serves and keeps its prefixes
    key: tuple[int, ...] | None = None  # its tokens, when the cache is used
    position: int = 0  # tokens fed so far (or found in the cache)
    stops: list[int] = field(default_factory=list)  # depths where its calls end, ascending
    next: int = 0  # the stop its next call ends at
    last: np.ndarray | None = None
    log_probs: np.ndarray | None = None


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
