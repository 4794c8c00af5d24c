"""What goes into an engine (requests) and what comes out (events on a request's stream).

Domain objects only: the gRPC layer converts protobuf to these and back; nothing here knows gRPC.
Deadlines are `time.monotonic()` instants.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from server.decoding import DecodingParams, FinishReason, Hypothesis

State = tuple[np.ndarray, ...]


@dataclass
class GenerationRequest:
    """An LM continues `prompt_ids` (a fresh generation starts with <bos>).

    `prompt_ids` are fed by the batched prefill, then decoding starts from the last of them. A session
    passes its parked state as `initial_state` (each tensor [1, ...]) and the tokens still to feed (at
    least one: its last token). `history_ids` are the tokens repetition_penalty and
    no_repeat_ngram_size look back on (default: `prompt_ids`). With `return_final_state` the finish
    event carries the state after every token but the last chosen one (the session parks it). A higher
    `priority` is admitted sooner and may park lower-priority rows (`server.engine.scheduler`).
    """

    request_id: str
    prompt_ids: list[int]
    params: DecodingParams
    initial_state: State | None = None
    history_ids: list[int] | None = None
    deadline: float | None = None
    return_final_state: bool = False
    priority: int = 0


@dataclass
class TranslationRequest:
    """A seq2seq model translates `source_ids` (tokenizer ids, no special tokens); `priority` as a
    GenerationRequest's."""

    request_id: str
    source_ids: list[int]
    params: DecodingParams
    return_attention: bool = False
    deadline: float | None = None
    priority: int = 0


@dataclass
class TokenEvent:
    """Tokens decoded in one step (greedy, sampling), or a beam request's best hypothesis at its end.

    `text` is the detokenised delta: the concatenation of a stream's deltas is the finish event's
    text. A possible start of a stop string is held back until the next token settles it.
    `log_probs` (one per token) when the request asked for them; `top_alternatives` (per token, the
    most probable (token_id, log_prob) pairs, best first) when it asked for top_logprobs.
    """

    token_ids: list[int]
    log_probs: list[float] | None
    top_alternatives: list[list[tuple[int, float]]] | None
    text: str


@dataclass
class FinishEvent:
    """The last event of a stream.

    `hypotheses` best first (n_best for beam, one otherwise; tokens exclude the prompt and <eos>);
    `text` and `generated_ids` are the best hypothesis' (a stop string and what follows it excluded
    from the text). `texts` is the text of every hypothesis. `final_state` (GenerationRequest with
    return_final_state, greedy or sampling) is the state after all tokens but `last_token_id`, the
    last chosen one (<eos> when the reason is EOS); a request cancelled while decoding has them too,
    for the tokens chosen before it left (none when it left before its first step). `attention`
    (TranslationRequest with return_attention): per hypothesis an array [steps, source_length], one
    row per chosen token, <eos> included when chosen. `seed`: the sampling seed used (drawn by the
    server if none was given).
    """

    reason: FinishReason
    hypotheses: list[Hypothesis]
    text: str
    generated_ids: list[int]
    final_state: State | None
    prompt_tokens: int
    texts: list[str] | None = None
    last_token_id: int | None = None
    attention: list[np.ndarray] | None = None
    seed: int | None = None


Event = TokenEvent | FinishEvent


class Mailbox:
    """Items one producer appends (on the event loop's thread) and one consumer takes, all that are ready
    at once: a deque and the consumer's wake-up future, what an asyncio.Queue does per item, for less."""

    def __init__(self, owner: str, on_abandoned: Callable[[], None]):
        self.items: deque = deque()
        self._owner = owner  # for the error naming a second consumer
        self._on_abandoned = on_abandoned  # the consumer's wait was cancelled (its caller left)
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        self.wake()

    def wake(self) -> None:
        """Wake the consumer without an item (the producer is done)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the next put or wake (at once if items are queued); a cancelled wait abandons the owner."""
        if self.items:
            return
        if self._waiter is not None:
            raise RuntimeError(f"{self._owner}: a second consumer waits on it")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self._on_abandoned()
            raise
        finally:
            self._waiter = None


class RequestStream:
    """Async iterator of one request's events; ends after its FinishEvent, or raises its error.

    `next_batch()` takes every event that is ready at once (for consumers that coalesce). Cancelling
    the task that waits on the stream (a disconnected gRPC client) or calling `cancel()` marks the
    request; the engine drops its rows at the next step. One consumer at a time.
    """

    def __init__(self, request_id: str, params: DecodingParams, on_cancel: Callable[[], None] | None = None,
                 on_end_taken: Callable[[], None] | None = None):
        self.request_id = request_id
        self.params = params  # validated, with the seed the server drew for sampling
        self.cancelled = False
        self.done = False  # the stream ended (finish event, error or `close`); what is still queued can be taken
        # Events, then possibly the error that ended the stream (always last: put and fail stop at done).
        self._mailbox = Mailbox(f"request {request_id}", self.cancel)
        self._items = self._mailbox.items
        self._on_cancel = on_cancel
        self._on_end_taken = on_end_taken  # called once the consumer has taken the last item of an ended stream

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        items = self._items
        while not items:
            if self.done:
                self._end_taken()
                raise StopAsyncIteration
            await self._mailbox.wait()
        item = items.popleft()
        if not items and self.done:
            self._end_taken()
        if isinstance(item, BaseException):
            raise item
        return item

    async def next_batch(self) -> list[Event]:
        """Every event ready now, waiting for the first if none is; [] once the stream has ended.

        An error ending the stream is raised after the events before it were taken (by the call after
        the one that returned them).
        """
        items = self._items
        while not items:
            if self.done:
                self._end_taken()
                return []
            await self._mailbox.wait()
        if isinstance(items[-1], BaseException):
            if len(items) == 1:
                self._end_taken()
                raise items.popleft()
            batch = list(items)
            items.clear()
            items.append(batch.pop())  # the error, for the next call
            return batch
        batch = list(items)
        items.clear()
        if self.done:
            self._end_taken()
        return batch

    async def result(self) -> FinishEvent:
        """Consume the stream; return its finish event (for unary calls)."""
        finish = None
        async for event in self:
            if isinstance(event, FinishEvent):
                finish = event
        if finish is None:  # the stream was cancelled before it finished
            raise asyncio.CancelledError(f"request {self.request_id} was cancelled")
        return finish

    def cancel(self) -> None:
        """Stop the request: its rows are freed at the engine's next step."""
        if self.cancelled or self.done:
            return
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    async def aclose(self) -> None:
        self.cancel()

    # Called by the producer (the engine, a session generation), on the event loop's thread.
    def put(self, event: Event) -> None:
        if self.done:
            return
        if isinstance(event, FinishEvent):
            self.done = True
        self._mailbox.put(event)

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self.done = True
        self._mailbox.put(error)

    def close(self) -> None:
        """End the stream without a finish event (its producer stopped before there was one)."""
        if self.done:
            return
        self.done = True
        self._mailbox.wake()

    def _end_taken(self) -> None:
        hook, self._on_end_taken = self._on_end_taken, None
        if hook is not None:
            hook()


@dataclass
class FeedRequest:
    """A session's feed: advance `state` (None: the zero state) by `token_ids` in the batched prefill.

    With `want_log_probs`, log_probs[i] is the log-prob the model gives the token after token_ids[i]:
    token_ids[i + 1], and `next_token_id` (if given) after the last one.
    """

    state: State | None
    token_ids: list[int]
    want_log_probs: bool = False
    next_token_id: int | None = None
    deadline: float | None = None
