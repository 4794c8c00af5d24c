"""SessionRecord: everything a session is, parked between operations, and its serialised form.

A session parks the form the engine continues from (`GenerationRequest` with `initial_state`): the
recurrent state after every token of its text but the last, and that last token, which is fed first
by whatever comes next. `history` is the end of the text (from `<bos>` on while it is short, the last
token included): what repetition_penalty, no_repeat_ngram_size and detokenisation look back on, so a
continuation decodes exactly as one generation over the same text would. It is kept to a bounded
tail (`advanced(..., keep=)`): the engine pads every row's history to the longest of its batch, so an
unbounded one would make a long session cost every request beside it. `to_bytes` / `from_bytes` carry a record across
processes (persistence, replicas): a JSON header (model, version, times, each tensor's dtype and
shape) followed by the raw little-endian buffers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace

import numpy as np

from server.engine.requests import State

MAGIC = b"SQSS"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sII")  # magic, format version, header length


class SessionFormatError(ValueError):
    """Bytes that are not a serialised session (or one of a format this server does not read)."""


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    model: str
    version: int  # the model version the session is bound to for its whole life
    state: State  # each [1, ...] float32: the state after the text but its last token
    history: np.ndarray  # int32 [T], read-only: the end of the text (<bos>, fed, generated); history[-1] is pending
    tokens_consumed: int  # tokens of the text after <bos>, fed and generated
    ttl_seconds: int  # idle time after which the session expires
    created_at: float  # unix seconds
    last_used_at: float  # unix seconds
    extra: dict = field(default_factory=dict)  # room for later fields; serialised as JSON
    revision: int = 1  # bumped by every change; a store writes a record only over revision - 1 (compare-and-set)
    checksum: str = ""  # the bundle's checksum of (model, version) when the session began ("" = not recorded)
    applied: tuple = ()  # (request_id, result dict) of the last few operations that carried a request_id

    def __post_init__(self):
        history = np.asarray(self.history, dtype=np.int32)
        if history.ndim != 1 or history.size == 0:
            raise ValueError("a session's history holds at least its first token (<bos>)")
        if history.flags.writeable:  # shared by forks: never changed in place
            history = history.copy()
            history.flags.writeable = False
        object.__setattr__(self, "history", history)

    @property
    def last_token_id(self) -> int:
        """The token the state has not read yet: the next operation feeds it first."""
        return int(self.history[-1])

    @property
    def state_bytes(self) -> int:
        return sum(int(s.nbytes) for s in self.state)

    def advanced(self, state: State, tokens: list[int] | np.ndarray, used_at: float, keep: int | None = None
                 ) -> SessionRecord:
        """The record after its state read history[-1] and `tokens[:-1]`: `tokens[-1]` is the new pending one.
        The history keeps its last `keep` tokens (all if None)."""
        history = np.concatenate([self.history, np.asarray(tokens, dtype=np.int32)])
        if keep is not None:
            history = history[-max(1, keep):]
        return replace(self, state=state, history=history, tokens_consumed=self.tokens_consumed + len(tokens),
                       last_used_at=used_at, revision=self.revision + 1)

    def touched(self, used_at: float) -> SessionRecord:
        """The record used at `used_at` without a change to its text (a new revision all the same)."""
        return replace(self, last_used_at=used_at, revision=self.revision + 1)

    def with_applied(self, request_id: str, result: dict, keep: int = 8, token_budget: int = 4096) -> SessionRecord:
        """The record remembering that the operation `request_id` gave `result`: the last `keep` ids, fewer if
        their answers hold more than `token_budget` token ids together (a record is written at every change)."""
        if not request_id:
            return self
        applied = list(item for item in self.applied if item[0] != request_id) + [(request_id, result)]
        applied = applied[-keep:]
        held = sum(len(answer.get("token_ids") or ()) for _, answer in applied)
        while len(applied) > 1 and held > token_budget:
            held -= len(applied.pop(0)[1].get("token_ids") or ())
        return replace(self, applied=tuple(applied))

    def applied_result(self, request_id: str) -> dict | None:
        """What the operation `request_id` gave, if this session applied it (among its last few)."""
        if request_id:
            for known, result in self.applied:
                if known == request_id:
                    return result
        return None

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_seconds

    def copy_as(self, session_id: str, ttl_seconds: int, now: float) -> SessionRecord:
        """A fork: a copy of the state (O(state bytes)); the read-only history is shared."""
        return replace(self, session_id=session_id, state=tuple(s.copy() for s in self.state),
                       ttl_seconds=ttl_seconds, created_at=now, last_used_at=now, extra=dict(self.extra),
                       revision=1, applied=())

    # --- serialisation ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        tensors = [np.ascontiguousarray(s) for s in self.state] + [self.history]
        header = {
            "session_id": self.session_id, "model": self.model, "version": self.version,
            "tokens_consumed": self.tokens_consumed, "ttl_seconds": self.ttl_seconds,
            "created_at": self.created_at, "last_used_at": self.last_used_at,
            "extra": self.extra, "revision": self.revision, "checksum": self.checksum,
            "applied": [list(item) for item in self.applied],
            "tensors": [{"dtype": t.dtype.newbyteorder("<").str, "shape": list(t.shape)} for t in tensors],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        body = b"".join(t.astype(t.dtype.newbyteorder("<"), copy=False).tobytes() for t in tensors)
        return _HEADER.pack(MAGIC, FORMAT_VERSION, len(head)) + head + body

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionRecord:
        if len(data) < _HEADER.size:
            raise SessionFormatError(f"a serialised session is at least {_HEADER.size} bytes, got {len(data)}")
        magic, version, head_length = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SessionFormatError(f"not a serialised session (magic {magic!r}, expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise SessionFormatError(f"session format {version} is not readable here (this server reads "
                                     f"{FORMAT_VERSION})")
        try:
            header = json.loads(data[_HEADER.size : _HEADER.size + head_length])
            specs = header["tensors"]
        except (ValueError, KeyError, TypeError) as error:
            raise SessionFormatError(f"the session header is damaged: {error}") from None
        offset = _HEADER.size + head_length
        tensors = []
        for spec in specs:
            dtype, shape = np.dtype(spec["dtype"]), tuple(int(d) for d in spec["shape"])
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if offset + size > len(data):
                raise SessionFormatError("the session's tensors are truncated")
            tensors.append(np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset)
                           .reshape(shape).astype(dtype.newbyteorder("="), copy=True))
            offset += size
        if offset != len(data) or not tensors:
            raise SessionFormatError(f"the session holds {len(data) - offset} bytes past its tensors")
        return cls(session_id=header["session_id"], model=header["model"], version=int(header["version"]),
                   state=tuple(tensors[:-1]), history=tensors[-1], tokens_consumed=int(header["tokens_consumed"]),
                   ttl_seconds=int(header["ttl_seconds"]),
                   created_at=float(header["created_at"]), last_used_at=float(header["last_used_at"]),
                   extra=dict(header.get("extra") or {}), revision=int(header.get("revision", 1)),
                   checksum=str(header.get("checksum", "")),
                   applied=tuple((str(rid), dict(result)) for rid, result in header.get("applied") or ()))
