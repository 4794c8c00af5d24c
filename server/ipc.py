"""The wire between the API processes and the engine process: messages on a Unix socket, one connection
per API process, asyncio's own transports at both ends (`Connection`).

A message is a 4-byte length and a pickle (protocol 5) of `(kind, payload)`, `kind` one of the names below.
A send is one write into the socket (no I/O thread, no futures): the engine process sends each step's
outputs to every API process as the step ends, and an API process reads whatever arrived in one go, so a
busy one takes several steps at once and its streams send their tokens together. Both ends are processes
of one server, started by one supervisor, over a socket in a directory only its user can open: pickle is
safe between them. A process that dies closes its end: the other side learns it at once.

API process -> engine process:
  HELLO (index, pid)              a new or restarted API process; the engine answers MODELS and ends
                                  whatever an earlier process of that index left running
  CALL (call_id, method, args, kwargs)   a request-reply operation (sessions, a pinned version's load, ...)
  SUBMIT (key, model, version, request)     a generation or translation whose outputs come back as OUT
  SESSION_GENERATE (key, session_id, params, leave_unchanged, request_id, retry_id, priority)
  CANCEL (key)                    the client left: drop the request's rows at the next step
  TAKEN (key)                     a session generation's caller took its finish (its session goes on)
engine process -> API process:
  MODELS (table)                  the models and loaded versions, after HELLO and after every change
  REPLY (call_id, ok, value)      a CALL's result, or (ok false) the error it raised
  OUT (StepOutput)                one step's outputs for this process's streams, keyed by their keys
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

HELLO, CALL, SUBMIT, SESSION_GENERATE, CANCEL, TAKEN = ("hello", "call", "submit", "session_generate", "cancel",
                                                      "taken")
MODELS, REPLY, OUT = "models", "reply", "out"

ENGINE_SOCKET = "engine.sock"  # in the server's runtime directory
_LENGTH = 4  # bytes of a message's length, big-endian


class Connection(asyncio.Protocol):
    """One end of a connection: `send(kind, payload)`; every message received goes to `on_message(kind,
    payload)`, in order, as it arrives; `on_lost(why)` once when the other end is gone."""

    def __init__(self, on_message: Callable[[str, object], None], on_lost: Callable[[Exception | None], None]):
        self._on_message, self._on_lost = on_message, on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def send(self, kind: str, payload) -> bool:
        """Write one message (at once, or when the socket takes it); False if the connection is gone."""
        if not self.open:
            return False
        data = pickle.dumps((kind, payload), protocol=5)
        self._transport.write(len(data).to_bytes(_LENGTH, "big") + data)
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start, size = 0, len(buffer)
        view = memoryview(buffer)
        try:
            while size - start >= _LENGTH:
                length = int.from_bytes(view[start : start + _LENGTH], "big")
                end = start + _LENGTH + length
                if end > size:
                    break
                kind, payload = pickle.loads(view[start + _LENGTH : end])
                start = end
                try:
                    self._on_message(kind, payload)
                except Exception:  # one bad message must not end the connection
                    logger.exception("handling a %s message failed", kind)
        finally:
            view.release()
            del buffer[:start]

    def connection_lost(self, error: Exception | None) -> None:
        self._transport = None
        self._on_lost(error)


@dataclass(frozen=True)
class LoadedVersion:
    """A version the engine process has loaded, as an API process needs to know it."""

    manifest: bytes  # the serialized Manifest (ModelSpec is rebuilt from it)
    variant: str
    path: str  # the bundle directory (tokenizers are read from it)
    providers: tuple[str, ...]
    requested_providers: tuple[str, ...]
    accepting: bool


@dataclass(frozen=True)
class ModelEntry:
    """One model of the engine's registry."""

    name: str
    versions: tuple[int, ...]
    serving_version: int | None
    loaded: dict[int, LoadedVersion]


@dataclass(frozen=True)
class ModelTable:
    started: bool
    models: tuple[ModelEntry, ...]
    max_input_tokens: int
    default_ttl_seconds: int  # sessions' (the Open Inference Protocol's ModelConfig reports it)


@dataclass(frozen=True)
class GenerationReady:
    """First item of a session generation's stream: the model version it runs on."""

    model: str
    version: int


@dataclass(frozen=True)
class GenerationConsumed:
    """Just before a session generation's finish: the session's tokens_consumed after it."""

    tokens_consumed: int
