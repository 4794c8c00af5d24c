"""Fixtures shared by the server tests that talk to a real server over gRPC."""

from __future__ import annotations

import grpc
import pytest

from seqserve.v1 import service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(server):
    """A blocking stub on the module's `server` (a running `server.app.ServerThread`)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.SeqserveStub(channel)
