"""ExportSession / ImportSession between two real servers: the imported session continues token for token;
signed bytes that were changed, unsigned bytes where a key is set, and bytes of another model version,
bundle or state shape are refused naming what differs. `seqserve client session export|import` too."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.client import main as client_main
from server.config import ServerConfig
from server.sessions.transfer import pack, unpack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "correct horse battery staple"
OPTIONS = pb.DecodingOptions(max_new_tokens=12, min_new_tokens=12)


def config(repository, **settings) -> ServerConfig:
    return ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                        log_level="warning", **settings)


@pytest.fixture(scope="module")
def servers(lm_repository, tmp_path_factory):
    """Two servers with a key (one of them on a SQLite store) and one without."""
    with ServerThread(config(lm_repository, session_signing_key=KEY)) as source, \
            ServerThread(config(lm_repository, session_signing_key=KEY,
                                session_store=f"sqlite:{tmp_path_factory.mktemp('db')}/s.db")) as target, \
            ServerThread(config(lm_repository)) as keyless:
        channels = [grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in (source, target, keyless)]
        yield [pb_grpc.SeqserveStub(c) for c in channels], [s.port for s in (source, target, keyless)]
        for channel in channels:
            channel.close()


def generated(stub, session_id: str) -> list[int]:
    responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session_id, options=OPTIONS, leave_session_unchanged=True)))
    return [t for r in responses[:-1] for t in r.chunk.token_ids]


def refused(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value


def test_a_session_moves_between_servers_and_continues_identically(servers):
    (source, target, _), _ = servers
    session = source.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the cat"))
    source.Feed(pb.FeedRequest(session_id=session.session_id, text=" sat on"))
    exported = source.ExportSession(pb.ExportSessionRequest(session_id=session.session_id))
    assert exported.session.tokens_consumed == 14 and exported.data[:4] == b"SQSX"
    moved = target.ImportSession(pb.ImportSessionRequest(data=exported.data))
    assert moved.session_id != session.session_id
    assert (moved.model, moved.version, moved.tokens_consumed) == ("tiny-lm", 1, 14)
    assert generated(target, moved.session_id) == generated(source, session.session_id)
    # The original stays open and independent.
    source.Feed(pb.FeedRequest(session_id=session.session_id, text=" a"))
    assert target.GetSession(pb.GetSessionRequest(session_id=moved.session_id)).tokens_consumed == 14


def test_tampered_or_unsigned_bytes_are_refused(servers):
    (source, target, keyless), _ = servers
    session = source.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="a dog"))
    data = bytearray(source.ExportSession(pb.ExportSessionRequest(session_id=session.session_id)).data)
    data[len(data) // 2] ^= 1  # one bit of the state
    error = refused(target.ImportSession, pb.ImportSessionRequest(data=bytes(data)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature does not match" in error.details()
    unsigned = keyless.ExportSession(pb.ExportSessionRequest(
        session_id=keyless.CreateSession(pb.CreateSessionRequest(model="tiny-lm")).session_id)).data
    error = refused(target.ImportSession, pb.ImportSessionRequest(data=unsigned))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not signed" in error.details()
    for junk, message in ((b"", "data must be"), (b"hello world", "not exported session bytes")):
        error = refused(keyless.ImportSession, pb.ImportSessionRequest(data=junk))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()


def test_bytes_that_do_not_fit_this_server_are_refused_naming_what_differs(servers):
    (_, _, keyless), _ = servers
    session = keyless.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the"))
    record = unpack(keyless.ExportSession(pb.ExportSessionRequest(session_id=session.session_id)).data, None)
    cases = [
        (replace(record, version=9), grpc.StatusCode.FAILED_PRECONDITION, "tiny-lm v9"),
        (replace(record, model="other-lm"), grpc.StatusCode.FAILED_PRECONDITION, "other-lm v1"),
        (replace(record, checksum="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION,
         "bundle checksum 0123456789abcdef"),
        (replace(record, state=tuple(np.zeros((1, 2, 7), np.float32) for _ in record.state)),
         grpc.StatusCode.INVALID_ARGUMENT, "[[1, 2, 7], [1, 2, 7]]"),
    ]
    for changed, code, message in cases:
        error = refused(keyless.ImportSession, pb.ImportSessionRequest(data=pack(changed, None)))
        assert error.code() == code and message in error.details(), (error.code(), error.details())
    assert keyless.ImportSession(pb.ImportSessionRequest(data=pack(record, None))).tokens_consumed == 3


def test_the_client_exports_and_imports(servers, tmp_path, capsys):
    (source, _, _), (source_port, target_port, _) = servers
    session = source.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix="the dog"))
    path = tmp_path / "session.bin"
    assert client_main(["session", "export", "--target", f"127.0.0.1:{source_port}", session.session_id,
                        "--output", str(path)]) == 0
    assert path.read_bytes()[:4] == b"SQSX"
    capsys.readouterr()
    assert client_main(["session", "import", "--target", f"127.0.0.1:{target_port}", str(path)]) == 0
    new_id = capsys.readouterr().out.strip()
    assert len(new_id) == 32 and new_id != session.session_id
