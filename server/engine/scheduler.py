"""Who runs at the next step: admission within the row and prefill budgets, deadlines, cancellation.

The scheduler never touches ONNX Runtime. The engine's two threads share it under the engine's lock:
requests are added and cancelled on the event loop's thread, and the worker asks it for a `Plan`
between steps and frees the rows of what finished, so its view of the active rows matches the batch
the worker holds.
Requests are admitted first come, first served (a beam request waiting for its beam_size rows is never
overtaken, so it cannot starve); sessions' feeds take no decode rows and have a queue of their own.
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
    drop: list[Entry] = field(default_factory=list)  # active, cancelled: free their rows
    expired: list[Entry] = field(default_factory=list)  # queued or active, past their deadline
    withdrawn: list[Entry] = field(default_factory=list)  # queued, cancelled before they ran

    def dropped_slots(self) -> list[int]:
        return [e.slot for e in self.drop] + [e.slot for e in self.expired if e.admitted_at is not None]


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.active: dict[int, Entry] = {}
        self.active_rows = 0
        self.queued = 0
        self._requests: deque[Entry] = deque()
        self._feeds: deque[Entry] = deque()
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
        (self._feeds if entry.is_feed else self._requests).append(entry)
        self.queued += 1
        if entry.deadline is not None:
            heapq.heappush(self._deadlines, (entry.deadline, entry.slot, entry))
            self._live_deadlines += 1

    def cancel(self, slot: int) -> None:
        """Mark a request cancelled; it leaves at the next plan."""
        self._cancelled.add(slot)

    @property
    def idle(self) -> bool:
        return not self.active and self.queued == 0

    def plan(self, now: float) -> Plan:
        plan = Plan()
        for slot in self._cancelled:
            entry = self._find(slot)
            if entry is None:
                continue
            if entry.deadline is not None and entry.deadline <= now + DEADLINE_SLACK_SECONDS:
                self._remove(entry, plan.expired)  # its caller left because the deadline came: count it so
            else:
                self._remove(entry, plan.drop if entry.stage is Stage.ACTIVE else plan.withdrawn)
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
            self._done(entry)
        return entry

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
        """Every queued and active entry, removed (the engine is stopping)."""
        entries = [*self.active.values(), *(e for q in (self._requests, self._feeds) for e in q
                                            if e.stage is Stage.QUEUED)]
        for entry in entries:
            self._remove(entry, [])
        return entries

    def _admit(self, plan: Plan, now: float) -> None:
        budget = self.config.max_prefill_tokens
        widest = count = 0

        def fits(entry: Entry) -> bool:
            # The prefill call is padded to its longest row; the first request always fits.
            return count == 0 or (count + 1) * max(widest, entry.input_tokens) <= budget

        while self._requests:
            entry = self._requests[0]
            if entry.stage is not Stage.QUEUED:
                self._requests.popleft()
                continue
            if self.active_rows + entry.rows > self.config.max_rows or not fits(entry):
                break
            self._requests.popleft()
            self._activate(entry, now, plan)
            widest, count = max(widest, entry.input_tokens), count + 1
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

    def _activate(self, entry: Entry, now: float, plan: Plan) -> None:
        entry.stage = Stage.ACTIVE
        entry.admitted_at = now
        self.queued -= 1
        self.active[entry.slot] = entry
        self.active_rows += entry.rows
        plan.admit.append(entry)

    def _find(self, slot: int) -> Entry | None:
        entry = self.active.get(slot)
        if entry is not None:
            return entry
        for queue in (self._requests, self._feeds):  # rare (a cancelled queued request): a scan is fine
            for queued in queue:
                if queued.slot == slot and queued.stage is Stage.QUEUED:
                    return queued
        return None

    def _remove(self, entry: Entry, into: list[Entry]) -> None:
        if entry.stage is Stage.ACTIVE:
            self.finish(entry.slot)
        elif entry.stage is Stage.QUEUED:
            self.queued -= 1  # the queue itself forgets it lazily, at admission
            self._done(entry)
        into.append(entry)


_HEAP_SLACK = 64  # ended entries the deadline heap may hold beyond twice the live ones before compaction
