"""Moving a session by hand: ExportSession's bytes and ImportSession's checks of them.

The bytes are `SQSX`, a format version, a flags byte, the record (`SessionRecord.to_bytes`: state,
history, model name, version, bundle checksum, times) and, when the server has a `session_signing_key`,
an HMAC-SHA256 tag over everything before it. A server with a key refuses bytes without a valid tag.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from server.errors import InvalidArgument
from server.sessions.record import SessionFormatError, SessionRecord

MAGIC = b"SQSX"
FORMAT_VERSION = 1
SIGNED = 1
_HEADER = struct.Struct("<4sHB")
_TAG_BYTES = 32


def pack(record: SessionRecord, key: bytes | None) -> bytes:
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, SIGNED if key else 0) + record.to_bytes()
    return body + hmac.new(key, body, hashlib.sha256).digest() if key else body


def unpack(data: bytes, key: bytes | None) -> SessionRecord:
    if len(data) < _HEADER.size:
        raise _bad(f"exported session bytes are at least {_HEADER.size} bytes long, got {len(data)}")
    magic, version, flags = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _bad(f"these are not exported session bytes (they start {magic!r}, not {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise _bad(f"exported session format {version} is not readable here (this server reads {FORMAT_VERSION})")
    signed = bool(flags & SIGNED)
    if key is not None:
        if not signed:
            raise _bad("the session bytes are not signed, and this server imports only sessions signed with its "
                       "session_signing_key")
        body, tag = data[:-_TAG_BYTES], data[-_TAG_BYTES:]
        if len(body) < _HEADER.size or not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
            raise _bad("the session bytes' signature does not match: they were changed after export, or signed "
                       "with another session_signing_key")
    else:
        body = data[:-_TAG_BYTES] if signed else data
    try:
        return SessionRecord.from_bytes(body[_HEADER.size:])
    except (SessionFormatError, ValueError) as error:
        raise _bad(f"the exported session is damaged: {error}") from None


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, field="data", value="<session bytes>", allowed="bytes from ExportSession")
