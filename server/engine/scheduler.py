"""Who runs at the next step: admission by priority within the row and prefill budgets, preemption by
parking, deadlines, cancellation.

The scheduler never touches ONNX Runtime. The engine's two threads share it under the engine's lock:
requests are added and cancelled on the event loop's thread, and the worker asks it for a `Plan`
between steps and frees the rows of what finished, so its view of the active rows matches the batch
the worker holds.

Order: the waiting request with the highest effective priority runs first, then the earliest arrival. A
request's effective priority is its own plus one level for every `priority_aging_seconds` it has waited,
never above `max_priority`: a request of priority p that waits is admitted before any request arriving after
it once (max_priority - p) aging periods have passed, and from then on no one parks it. The first waiting
request that cannot run stops admission (a beam request waiting for its beam_size rows is never overtaken).
When the rows are full, it parks running greedy or sampling rows of a lower effective priority (the lowest
first, the most recently admitted first among equals; a running row keeps the effective priority it was
admitted with): their state and decoding columns are set aside and they wait as parked entries, which
resume later exactly where they stopped. Beam rows are never parked: their decoding state is spread over
their beam group (hypotheses, scores, finished lists), and a beam request ends within max_new_tokens steps.
Sessions' feeds take no decode rows and have a queue of their own, first come, first served.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from server.decoding import DecodingParams
from server.engine.config import EngineConfig
from server.engine.requests import Consumer, FeedRequest, GenerationRequest, TranslationRequest
from server.errors import DEADLINE_SLACK_SECONDS, ResourceExhausted


class Stage(Enum):
    QUEUED = "queued"
    ACTIVE = "active"
    PARKED = "parked"  # admitted, then set aside for a higher-priority request; waits to resume
    DONE = "done"


@dataclass(eq=False)
class Entry:
    """One request from submission to its end."""

    slot: int  # unique within the engine: the id its rows carry
    request: GenerationRequest | TranslationRequest | FeedRequest
    params: DecodingParams | None  # validated (None for a feed)
    rows: int  # decode rows while active: 1, beam_size, or 0 for a feed
    input_tokens: int  # tokens the prefill or encode call feeds for it
    enqueued_at: float
    consumer: Consumer | None = None  # generations and translations: where their outputs go ...
    key: int = -1  # ... under this key
    future: asyncio.Future | None = None  # feeds
    stage: Stage = Stage.QUEUED
    admitted_at: float | None = None
    priority: int = 0  # the request's own (validated) priority: higher runs sooner
    boost: int = 0  # levels earned by waiting, kept from its last admission on
    waiting_since: float | None = None  # when it last began to wait: its arrival, or when it was parked
    running_priority: int = 0  # its effective priority when last admitted: what a preemption weighs
    parked_at: float | None = None  # set while it is parked

    @property
    def preemptable(self) -> bool:
        """Greedy and sampling rows can be parked and resumed exactly; beam rows and feeds cannot."""
        return self.params is not None and self.params.strategy != "beam"

    @property
    def deadline(self) -> float | None:
        return self.request.deadline

    @property
    def is_feed(self) -> bool:
        return isinstance(self.request, FeedRequest)

    @property
    def request_id(self) -> str:
        """How messages name it: the request's id, or its slot for a session's feed (which has no id)."""
        return str(self.slot) if isinstance(self.request, FeedRequest) else self.request.request_id


@dataclass
class Plan:
    admit: list[Entry] = field(default_factory=list)  # prefill/encode them, then they join the batch
    park: list[Entry] = field(default_factory=list)  # active: set their rows aside (a higher priority waits)
    resume: list[Entry] = field(default_factory=list)  # parked: their rows join the batch again
    drop: list[Entry] = field(default_factory=list)  # active or parked, cancelled: free their rows
    expired: list[Entry] = field(default_factory=list)  # queued, active or parked, past their deadline
    withdrawn: list[Entry] = field(default_factory=list)  # queued, cancelled before they ran

    def dropped_slots(self) -> list[int]:
        return [e.slot for e in self.drop] + [e.slot for e in self.expired if e.admitted_at is not None]


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.active: dict[int, Entry] = {}
        self.active_rows = 0
        self.queued = 0  # requests waiting for their first admission (parked ones not included)
        self.parked: dict[int, Entry] = {}
        self.parked_rows = 0
        # Waiting requests by (priority class, parked?), each line first come first served: new requests by
        # their own priority, parked ones by the priority they ran with. Within a line the head has waited
        # longest, so it has the line's highest effective priority: only heads are compared.
        self._waiting: dict[tuple[int, bool], deque[Entry]] = {}
        self._feeds: deque[Entry] = deque()
        # Running entries that may be parked, by running priority, each in admission order.
        self._running: dict[int, dict[int, Entry]] = {}
        self._cancelled: set[int] = set()
        # A heap of (deadline, slot, entry). An entry that ends before its deadline stays in the heap
        # until the heap is compacted: it holds at most twice the live entries that have a deadline.
        self._deadlines: list[tuple[float, int, Entry]] = []
        self._live_deadlines = 0
        self._slots = itertools.count()

    def new_slot(self) -> int:
        return next(self._slots)

    def add(self, entry: Entry) -> None:
        """Queue a request; ResourceExhausted when the queue is full."""
        if self.queued >= self.config.max_queued:
            raise ResourceExhausted(
                f"the queue of this model is full ({self.config.max_queued} requests waiting); retry later")
        entry.waiting_since = entry.enqueued_at
        (self._feeds if entry.is_feed else self._line(entry.priority, False)).append(entry)
        self.queued += 1
        if entry.deadline is not None:
            heapq.heappush(self._deadlines, (entry.deadline, entry.slot, entry))
            self._live_deadlines += 1

    def cancel(self, slot: int) -> None:
        """Mark a request cancelled; it leaves at the next plan."""
        self._cancelled.add(slot)

    @property
    def idle(self) -> bool:
        return not self.active and self.queued == 0 and not self.parked

    def plan(self, now: float) -> Plan:
        plan = Plan()
        for slot in self._cancelled:
            entry = self._find(slot)
            if entry is None:
                continue
            if entry.deadline is not None and entry.deadline <= now + DEADLINE_SLACK_SECONDS:
                self._remove(entry, plan.expired)  # its caller left because the deadline came: count it so
            else:
                self._remove(entry, plan.withdrawn if entry.stage is Stage.QUEUED else plan.drop)
        self._cancelled.clear()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, entry = heapq.heappop(self._deadlines)
            if entry.stage is not Stage.DONE:
                self._remove(entry, plan.expired)
        self._admit(plan, now)
        return plan

    @property
    def tracked_deadlines(self) -> int:
        """Entries the deadline heap holds, live or ended (bounded by twice the live ones, plus a few)."""
        return len(self._deadlines)

    def finish(self, slot: int) -> Entry | None:
        """A request ended (finished, failed): its rows are free."""
        entry = self.active.pop(slot, None)
        if entry is not None:
            self.active_rows -= entry.rows
            self._not_running(entry)
            self._done(entry)
        return entry

    def end_admitted(self) -> list[Entry]:
        """Every active and parked entry, ended (a step failed: the batch and the parked rows are gone)."""
        entries = [*self.active.values(), *self.parked.values()]
        for entry in entries:
            self._remove(entry, [])
        return entries

    def effective_priority(self, entry: Entry, now: float) -> int:
        """A waiting entry's priority with what its wait has earned (aging), at most max_priority."""
        level = entry.priority + entry.boost
        aging = self.config.priority_aging_seconds
        if aging > 0:
            level += int((now - entry.waiting_since) / aging)
        return min(level, self.config.limits.max_priority)

    def _done(self, entry: Entry) -> None:
        """Mark an entry ended and forget its deadline (the heap drops ended entries in bulk)."""
        if entry.stage is Stage.DONE:
            return
        entry.stage = Stage.DONE
        if entry.deadline is None:
            return
        self._live_deadlines -= 1
        if len(self._deadlines) > 2 * self._live_deadlines + _HEAP_SLACK:
            self._deadlines = [item for item in self._deadlines if item[2].stage is not Stage.DONE]
            heapq.heapify(self._deadlines)

    def drain_all(self) -> list[Entry]:
        """Every queued, active and parked entry, removed (the engine is stopping)."""
        waiting = (e for q in (*self._waiting.values(), self._feeds) for e in q if e.stage is Stage.QUEUED)
        entries = [*self.active.values(), *self.parked.values(), *waiting]
        for entry in entries:
            self._remove(entry, [])
        return entries

    def _admit(self, plan: Plan, now: float) -> None:
        budget = self.config.max_prefill_tokens
        widest = count = 0

        def fits(entry: Entry) -> bool:
            # The prefill call is padded to its longest row; the first request always fits.
            return count == 0 or (count + 1) * max(widest, entry.input_tokens) <= budget

        joined = []
        while (best := self._best(now)) is not None:
            entry, line, effective = best
            resuming = entry.stage is Stage.PARKED
            if not resuming and not fits(entry):
                break
            short = self.active_rows + entry.rows - self.config.max_rows
            if short > 0:
                victims = self._victims(effective, short)
                if victims is None:
                    break
                for victim in victims:
                    self._park(victim, now, plan)
            line.popleft()
            entry.running_priority, entry.boost = effective, effective - entry.priority
            if resuming:
                self._resume(entry, plan)
            else:
                self._activate(entry, now, plan)
                widest, count = max(widest, entry.input_tokens), count + 1
            joined.append(entry)
        for entry in joined:  # from the next plan on they are in the batch, and may be parked
            if entry.stage is Stage.ACTIVE and entry.preemptable:
                self._running.setdefault(entry.running_priority, {})[entry.slot] = entry
        while self._feeds:
            entry = self._feeds[0]
            if entry.stage is not Stage.QUEUED:
                self._feeds.popleft()
                continue
            if not fits(entry):
                break
            self._feeds.popleft()
            self._activate(entry, now, plan)
            widest, count = max(widest, entry.input_tokens), count + 1

    def _best(self, now: float) -> tuple[Entry, deque[Entry], int] | None:
        """The waiting request to run next, its line, and its effective priority (None: nobody waits)."""
        best = None
        for key in list(self._waiting):
            line = self._waiting[key]
            while line and line[0].stage not in (Stage.QUEUED, Stage.PARKED):
                line.popleft()  # cancelled while waiting: the line forgets it lazily
            if not line:
                del self._waiting[key]
                continue
            head = line[0]
            effective = self.effective_priority(head, now)
            if best is None or effective > best[2] or (effective == best[2] and head.slot < best[0].slot):
                best = (head, line, effective)
        return best

    def _victims(self, priority: int, rows: int) -> list[Entry] | None:
        """Running entries to park so that `rows` rows free up for a request of effective `priority`: the
        lowest running priority first, the latest admitted first among equals; None if there are not enough
        of a lower priority (then nothing is parked)."""
        if not self._running or min(self._running) >= priority:
            return None
        victims, freed = [], 0
        for level in sorted(self._running):
            if level >= priority:
                break
            for entry in reversed(self._running[level].values()):
                victims.append(entry)
                freed += entry.rows
                if freed >= rows:
                    return victims
        return None

    def _park(self, entry: Entry, now: float, plan: Plan) -> None:
        del self.active[entry.slot]
        self.active_rows -= entry.rows
        self._not_running(entry)
        entry.stage, entry.parked_at, entry.waiting_since = Stage.PARKED, now, now
        self.parked[entry.slot] = entry
        self.parked_rows += entry.rows
        self._line(entry.running_priority, True).append(entry)
        plan.park.append(entry)

    def _resume(self, entry: Entry, plan: Plan) -> None:
        del self.parked[entry.slot]
        self.parked_rows -= entry.rows
        entry.stage, entry.parked_at = Stage.ACTIVE, None
        self.active[entry.slot] = entry
        self.active_rows += entry.rows
        plan.resume.append(entry)

    def _activate(self, entry: Entry, now: float, plan: Plan) -> None:
        entry.stage = Stage.ACTIVE
        entry.admitted_at = now
        self.queued -= 1
        self.active[entry.slot] = entry
        self.active_rows += entry.rows
        plan.admit.append(entry)

    def _line(self, priority: int, parked: bool) -> deque[Entry]:
        line = self._waiting.get((priority, parked))
        if line is None:
            line = self._waiting[priority, parked] = deque()
        return line

    def _not_running(self, entry: Entry) -> None:
        level = self._running.get(entry.running_priority)
        if level is not None and level.pop(entry.slot, None) is not None and not level:
            del self._running[entry.running_priority]

    def _find(self, slot: int) -> Entry | None:
        entry = self.active.get(slot) or self.parked.get(slot)
        if entry is not None:
            return entry
        for line in (*self._waiting.values(), self._feeds):  # rare (a cancelled queued request): a scan is fine
            for queued in line:
                if queued.slot == slot and queued.stage is Stage.QUEUED:
                    return queued
        return None

    def _remove(self, entry: Entry, into: list[Entry]) -> None:
        if entry.stage is Stage.ACTIVE:
            self.finish(entry.slot)
        elif entry.stage is Stage.PARKED:
            del self.parked[entry.slot]  # its line forgets it lazily
            self.parked_rows -= entry.rows
            self._done(entry)
        elif entry.stage is Stage.QUEUED:
            self.queued -= 1  # the queue itself forgets it lazily, at admission
            self._done(entry)
        into.append(entry)


_HEAP_SLACK = 64  # ended entries the deadline heap may hold beyond twice the live ones before compaction
