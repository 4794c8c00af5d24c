"""Requests that do not parse: which string field is not UTF-8, found by walking the wire format.

gRPC only says a message did not parse; the interceptor's deserializer (`safe_deserializer`) hands an
`Undecodable` on instead of raising, and the call then fails with an InvalidArgument naming the field,
e.g. "sources[1]". The walk runs on the error path only.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from server.errors import InvalidArgument


@dataclass(frozen=True)
class Undecodable:
    """What the safe deserializer hands on in place of a request that failed to parse."""

    error: InvalidArgument


def decode_error(descriptor: Descriptor | None, data: bytes, error: Exception) -> InvalidArgument:
    """An InvalidArgument for bytes that do not parse as `descriptor`: names the bad UTF-8 field if any."""
    if descriptor is not None:
        found = find_invalid_utf8(descriptor, data)
        if found is not None:
            path, raw = found
            return InvalidArgument(f"{path} must be valid UTF-8, got the bytes {raw[:32]!r}",
                                   field=path, value=raw[:32], allowed="valid UTF-8")
    name = descriptor.full_name if descriptor is not None else "request"
    return InvalidArgument(f"the request is not a valid {name}: {error}")


def find_invalid_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> tuple[str, bytes] | None:
    """(field path, raw bytes) of the first string field of `data` that is not UTF-8, else None.

    gRPC only says the message did not parse; walking the wire format once more (on the error path
    only) lets the message name the field, e.g. "sources[1]".
    """
    counts: dict[int, int] = {}
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type == 1:
                position += 8
            elif wire_type == 5:
                position += 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                chunk, position = data[position:position + length], position + length
                found = _check_field(descriptor.fields_by_number.get(number), chunk, counts, number, prefix)
                if found is not None:
                    return found
            else:
                return None  # groups are not used by proto3; anything else is noise
    except IndexError:
        return None
    return None


def safe_deserializer(deserializer):
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError; the walk below says which field
            return Undecodable(decode_error(descriptor, data, error))

    return deserialize


async def checked_stream(requests):
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request


def _check_field(field: FieldDescriptor | None, chunk: bytes, counts: dict[int, int], number: int,
                 prefix: str) -> tuple[str, bytes] | None:
    if field is None or field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
        return None
    path = prefix + field.name
    if field.is_repeated:
        path += f"[{counts.get(number, 0)}]"
        counts[number] = counts.get(number, 0) + 1
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return find_invalid_utf8(field.message_type, chunk, path + ".")
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return path, chunk
    return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
