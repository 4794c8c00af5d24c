"""Domain errors the server raises; the gRPC layer maps each `code` to a status (no grpc import here).

`code` is the name of a gRPC status code (`grpc.StatusCode`, `google.rpc.Code`): `server.api.status.status_of`
answers an error with that code, its message and details.
"""

from __future__ import annotations

from typing import Any

_UNSET: Any = object()


class SeqserveError(Exception):
    """An error a client can act on: `message` is shown to them as is."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(SeqserveError):
    """A bad parameter or input. Built from (field, value, allowed) it reads
    "top_p must be in (0, 1], got 1.5"; a full `message` may replace that sentence.
    """

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str | None = None, *, field: str | None = None, value: Any = _UNSET,
                 allowed: str | None = None):
        if message is None:
            if field is None or allowed is None or value is _UNSET:
                raise TypeError("InvalidArgument needs a message or all of field, value and allowed")
            message = f"{field} must be {allowed}, got {shown(value)}"
        super().__init__(message)
        self.field = field
        self.value = None if value is _UNSET else value
        self.allowed = allowed


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to about `limit` characters: a client's 4 MB string must not come back in an error."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str | bytes) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


class NotFound(SeqserveError):
    """Unknown model, version or session."""

    code = "NOT_FOUND"


class FailedPrecondition(SeqserveError):
    """An RPC the model's kind does not support (Translate on a language model)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(SeqserveError):
    """Queue full, session limit reached, message too large."""

    code = "RESOURCE_EXHAUSTED"


# A call that ends this close to its deadline ended because of it: the client's own timer fires a little
# before the server's (the deadline travels as a relative timeout), and its cancellation arrives first.
DEADLINE_SLACK_SECONDS = 0.05


class DeadlineExceeded(SeqserveError):
    """The request's deadline passed before it finished."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(SeqserveError):
    """The server is draining or the model is still loading."""

    code = "UNAVAILABLE"


class Unauthenticated(SeqserveError):
    """Missing or wrong credentials (when auth is on)."""

    code = "UNAUTHENTICATED"


class Aborted(SeqserveError):
    """An operation lost a race with another replica on the same session and was not applied; retry it."""

    code = "ABORTED"


class StartupError(RuntimeError):
    """The server cannot start as configured (the message names the setting); not an answer to a call."""
