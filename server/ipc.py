"""The wire between the API processes and the engine process: ZeroMQ multipart messages on a Unix socket.

Every message is `[kind, payload, *buffers]`: `kind` one of the names below, `payload` a pickle (protocol
5) whose large arrays (a step's token ids) travel out of band as frames of their own, so a step's output
is a handful of frames whatever its rows. Both ends are seqserve processes of one server, started by one
supervisor, over a socket in a directory only its user can open: pickle is safe between them.

API process -> engine process (a DEALER socket, identity `api-N`):
  HELLO (index, pid)              a new or restarted API process; the engine answers MODELS and ends
                                  whatever an earlier process of that index left running
  CALL (call_id, method, args, kwargs)   a request-reply operation (sessions, a pinned version's load, ...)
  SUBMIT (key, model, version, request)     a generation or translation whose outputs come back as OUT
  SESSION_GENERATE (key, session_id, params, leave_unchanged, request_id, retry_id, priority)
  CANCEL (key)                    the client left: drop the request's rows at the next step
  TAKEN (key)                     a session generation's caller took its finish (its session goes on)
  BEAT ()                         alive (an API process silent for long has its requests cancelled)
engine process -> API process (a ROUTER socket):
  MODELS (table)                  the models and loaded versions, after HELLO and after every change
  REPLY (call_id, ok, value)      a CALL's result, or (ok false) the error it raised
  OUT (StepOutput)                one step's outputs for this process's streams, keyed by their keys
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

HELLO, CALL, SUBMIT, SESSION_GENERATE, CANCEL, TAKEN, BEAT = (b"hello", b"call", b"submit", b"session_generate",
                                                               b"cancel", b"taken", b"beat")
MODELS, REPLY, OUT = b"models", b"reply", b"out"

ENGINE_SOCKET = "engine.sock"  # in the server's runtime directory
BEAT_SECONDS = 1.0  # how often an API process says it is alive
SILENT_SECONDS = 15.0  # an API process not heard from for this long is gone: its requests are cancelled


def encode(kind: bytes, payload) -> list:
    """The frames of one message."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    return [kind, data, *buffers]


def decode(frames: list) -> tuple[bytes, object]:
    """(kind, payload) of one message's frames (bytes or zmq Frames)."""
    kind = bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    return kind, pickle.loads(frames[1].buffer if hasattr(frames[1], "buffer") else frames[1],
                              buffers=[f.buffer if hasattr(f, "buffer") else f for f in frames[2:]])


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
