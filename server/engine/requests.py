"""What goes into an engine (requests) and what comes out (events on a request's stream).

Domain objects only: the gRPC layer converts protobuf to these and back; nothing here knows gRPC.
Deadlines are `time.monotonic()` instants.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.decoding import DecodingParams, FinishReason, Hypothesis
from server.text.table import TableDecoder, TokenTable

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


def context_of(request: GenerationRequest | TranslationRequest) -> list[int]:
    """The tokens a request's output text continues (an LM's prompt or history; nothing for a translation):
    after text, a word tokenizer's first word starts with its separator."""
    if isinstance(request, GenerationRequest):
        return request.history_ids if request.history_ids is not None else request.prompt_ids
    return []


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
    """What one producer hands a consumer (on the event loop's thread), taken all at once when ready:
    items (events, an error) in a deque, the tokens of plain rows in a list of their own, and the
    consumer's wake-up future: what an asyncio.Queue does per item, for less."""

    def __init__(self, owner: str, on_abandoned: Callable[[], None]):
        self.items: deque = deque()
        self.tokens: list[int] = []  # plain rows' tokens, all before any item (see `RequestStream.put_token`)
        self._owner = owner  # for the error naming a second consumer
        self._on_abandoned = on_abandoned  # the consumer's wait was cancelled (its caller left)
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        self.wake()

    def wake(self) -> None:
        """Wake the consumer without an item (a token arrived, or the producer is done)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the next put or wake (at once if anything is queued); a cancelled wait abandons the owner."""
        if self.items or self.tokens:
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

    A plain row's tokens (greedy or sampling, no stop strings, log-probs, alternatives or attention)
    arrive as bare token ids (`put_token`, from a `StepOutput`'s arrays) and become text only when the
    consumer takes them: all that piled up in one TokenEvent, decoded by `table` (the model's output
    `TokenTable`) after `context_ids` (the prompt: a word tokenizer's first word then starts with a space).
    """

    def __init__(self, request_id: str, params: DecodingParams, on_cancel: Callable[[], None] | None = None,
                 on_end_taken: Callable[[], None] | None = None, *, table: TokenTable | None = None,
                 context_ids: Sequence[int] = ()):
        self.request_id = request_id
        self.params = params  # validated, with the seed the server drew for sampling
        self.cancelled = False
        self.done = False  # the stream ended (finish event, error or `close`); what is still queued can be taken
        # Events, then possibly the error that ended the stream (always last: put and fail stop at done).
        self._mailbox = Mailbox(f"request {request_id}", self.cancel)
        self._items = self._mailbox.items
        self._tokens = self._mailbox.tokens
        self._on_cancel = on_cancel
        self._on_end_taken = on_end_taken  # called once the consumer has taken the last item of an ended stream
        self._table, self._context_ids = table, context_ids
        self._decoder: TableDecoder | None = None  # made with the first plain token
        self._ended: asyncio.Future | None = None  # `hold`'s wait for the end

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        items = self._items
        while not items and not self._tokens:
            if self.done:
                self._end_taken()
                raise StopAsyncIteration
            await self._mailbox.wait()
        plain = self._plain_event()
        if plain is not None:
            return plain
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
        while not items and not self._tokens:
            if self.done:
                self._end_taken()
                return []
            await self._mailbox.wait()
        plain = self._plain_event()
        batch = [plain] if plain is not None else []
        if items and isinstance(items[-1], BaseException):
            if len(items) == 1 and not batch:
                self._end_taken()
                raise items.popleft()
            error = items.pop()
            batch += items
            items.clear()
            items.append(error)  # for the next call
            return batch
        batch += items
        items.clear()
        if self.done:
            self._end_taken()
        return batch

    async def hold(self, until: float) -> None:
        """Wait until the event loop's clock reads `until`, or less if the stream ends first (its last
        events are never held back). Tokens arriving meanwhile wake nobody: they pile up for the next take."""
        loop = asyncio.get_running_loop()
        delay = until - loop.time()
        if delay <= 0 or self.done:
            return
        ended = self._ended = loop.create_future()
        timer = loop.call_later(delay, _resolve, ended)
        try:
            await ended
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            timer.cancel()
            self._ended = None

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
    def put_token(self, token_id: int) -> None:
        """A plain row's token (decoded when taken)."""
        if self.done:
            return
        self._tokens.append(token_id)
        self._mailbox.wake()

    def put(self, event: Event) -> None:
        if self.done:
            return
        if isinstance(event, FinishEvent):
            self._end()
        self._mailbox.put(event)

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self._end()
        self._mailbox.put(error)

    def close(self) -> None:
        """End the stream without a finish event (its producer stopped before there was one)."""
        if self.done:
            return
        self._end()
        self._mailbox.wake()

    def _end(self) -> None:
        self.done = True
        if self._ended is not None:
            _resolve(self._ended)

    def _plain_event(self) -> TokenEvent | None:
        """The plain tokens that piled up, as one event with their text; at the end of a finished stream the
        text of an incomplete last character too (a cancelled one leaves it out, as its final text does)."""
        tokens = self._tokens
        if not tokens and self._decoder is None:
            return None
        if tokens and self._decoder is None:
            self._decoder = TableDecoder(self._table, self._context_ids)
        text = self._decoder.push_many(tokens) if tokens else ""
        items = self._items
        if items and isinstance(items[0], FinishEvent) and items[0].reason is not FinishReason.CANCELLED:
            text += self._decoder.flush()
        if not tokens and not text:
            return None
        event = TokenEvent(token_ids=list(tokens), log_probs=None, top_alternatives=None, text=text)
        tokens.clear()
        return event

    def _end_taken(self) -> None:
        hook, self._on_end_taken = self._on_end_taken, None
        if hook is not None:
            hook()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class StepOutput:
    """What one consumer gets of one engine step, handed over at once: the plain rows' tokens as arrays (a
    row's key, its token), then every other event or error in order, each with its request's key."""

    keys: np.ndarray  # [R] int64
    tokens: np.ndarray  # [R] int64
    events: list[tuple[int, Event | BaseException]]

    def __len__(self) -> int:
        return len(self.keys) + len(self.events)


_CONSUMER_IDS = itertools.count()


class Consumer:
    """Where an engine delivers the outputs of the requests submitted for it (`ModelEngine.submit_for`):
    a table of streams in this process, or another process's (an API process's, over IPC)."""

    def __init__(self):
        self.consumer_id = next(_CONSUMER_IDS)  # the engine groups a step's plain tokens by it

    def deliver(self, output: StepOutput) -> None:
        """One step's outputs for this consumer, on the engine's event loop thread."""
        raise NotImplementedError


class StreamTable(Consumer):
    """Request streams by key; a step's outputs go to them (plain tokens first, then events)."""

    def __init__(self):
        super().__init__()
        self.streams: dict[int, RequestStream] = {}

    def __len__(self) -> int:
        return len(self.streams)

    def add(self, key: int, stream: RequestStream) -> None:
        self.streams[key] = stream

    def discard(self, key: int) -> None:
        self.streams.pop(key, None)

    def deliver(self, output: StepOutput) -> None:
        streams = self.streams
        if len(output.keys):
            for key, token in zip(output.keys.tolist(), output.tokens.tolist(), strict=True):
                stream = streams.get(key)
                if stream is not None:
                    stream.put_token(token)
        for key, item in output.events:
            stream = streams.get(key)
            if stream is None:
                continue
            if isinstance(item, BaseException):
                stream.fail(item)
            else:
                stream.put(item)
            if stream.done:
                del streams[key]

    def fail_all(self, error: BaseException) -> None:
        """End every stream with `error` (its producer is gone)."""
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(error)


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
