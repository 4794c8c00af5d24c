"""server/api/wire.py: the wire-format walk that names the string field holding bad UTF-8."""

from __future__ import annotations

from seqserve.v1 import service_pb2 as pb
from server.api.wire import find_invalid_utf8


def test_find_invalid_utf8_walks_nested_and_repeated_fields():
    request = pb.TranslateRequest(sources=["a", "b"], options=pb.DecodingOptions(stop=["x", "y"], top_k=3))
    data = request.SerializeToString()
    assert find_invalid_utf8(pb.TranslateRequest.DESCRIPTOR, data) is None
    broken = data.replace(b"\x62\x01y", b"\x62\x01\xff")
    assert find_invalid_utf8(pb.TranslateRequest.DESCRIPTOR, broken) == ("options.stop[1]", b"\xff")
