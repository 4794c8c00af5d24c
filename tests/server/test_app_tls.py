"""TLS, mutual TLS and bearer tokens against a real server, with certificates made by openssl for the test:
the happy paths and every refusal (no TLS, an unknown CA, no or a foreign client certificate, a wrong or
rotated-out token), /metrics over HTTPS, and start-up errors naming the setting."""

from __future__ import annotations

import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.api import auth
from server.app import ServerThread
from server.client import ClientError, channel_credentials, main
from server.config import ConfigError, ServerConfig

SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))
LIST = pb.ListModelsRequest()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)


def make_signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed; a second, foreign CA
    with a client certificate of its own."""
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "rogue-ca")
    make_signed(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                           "extendedKeyUsage=serverAuth\n")
    make_signed(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_signed(directory, "rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return directory


@pytest.fixture(scope="module")
def repository(tiny_runs, tmp_path_factory) -> Path:
    repository = tmp_path_factory.mktemp("repository")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export_run(tiny_runs["lstm", "lm"], repository, "tiny-lm", options=SMALL_EXPORT)
    finally:
        torch.set_num_threads(before)
    return repository


def config(repository: Path, **settings) -> ServerConfig:
    return ServerConfig(**{"repository": str(repository), "port": 0, "metrics_port": -1, "poll_interval_seconds": 0,
                           "log_level": "error", **settings})


def tls(pki: Path, **extra) -> dict:
    return dict(tls_cert_file=str(pki / "server.crt"), tls_key_file=str(pki / "server.key"), **extra)


def credentials(pki: Path, ca: str = "ca", client: str | None = None) -> grpc.ChannelCredentials:
    return channel_credentials(str(pki / f"{ca}.crt"), *((str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
                                                         if client else (None, None)))


def list_models(port: int, creds: grpc.ChannelCredentials | None, metadata=()) -> pb.ListModelsResponse:
    channel = (grpc.secure_channel(f"127.0.0.1:{port}", creds) if creds is not None
               else grpc.insecure_channel(f"127.0.0.1:{port}"))
    with channel:
        return pb_grpc.SeqserveStub(channel).ListModels(LIST, timeout=10, metadata=metadata)


def refused(port: int, creds, metadata=()) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        list_models(port, creds, metadata)
    return caught.value.code()


def test_tls_serves_clients_that_trust_its_ca_and_refuses_the_rest(repository, pki):
    with ServerThread(config(repository, **tls(pki))) as server:
        assert [m.name for m in list_models(server.port, credentials(pki)).models] == ["tiny-lm"]
        # A client certificate is not needed, but one is accepted.
        assert list_models(server.port, credentials(pki, client="client")).models
        assert refused(server.port, None) == grpc.StatusCode.UNAVAILABLE  # plain text to a TLS port
        assert refused(server.port, credentials(pki, ca="rogue-ca")) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_its_ca(repository, pki):
    with ServerThread(config(repository, **tls(pki, tls_client_ca_file=str(pki / "ca.crt")))) as server:
        assert list_models(server.port, credentials(pki, client="client")).models
        assert refused(server.port, credentials(pki)) == grpc.StatusCode.UNAVAILABLE
        assert refused(server.port, credentials(pki, client="rogue-client")) == grpc.StatusCode.UNAVAILABLE


def test_metrics_over_https_with_the_same_files(repository, pki):
    settings = tls(pki, tls_client_ca_file=str(pki / "ca.crt"), metrics_tls=True)
    with ServerThread(config(repository, **{**settings, "metrics_port": 0})) as server:
        url = f"https://127.0.0.1:{server.app.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        body = urllib.request.urlopen(url, context=context, timeout=10).read().decode()
        assert "seqserve_model_info" in body
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(url, context=anonymous, timeout=10).read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the HTTPS port
            urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=10).read()


def rewrite(path: Path, text: str) -> None:
    """Write `text` with a modification time one second after the file's last, whatever the file system's
    timestamp granularity (the server notices a change by it)."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_several_tokens_rotate_through_the_token_file(repository, tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_CHECK_SECONDS", 0.0)
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated monthly\nold-token\nnew-token\n")
    with ServerThread(config(repository, auth_token="fixed", auth_token_file=str(tokens))) as server:
        for token in ("fixed", "old-token", "new-token"):
            assert list_models(server.port, None, (("authorization", f"Bearer {token}"),)).models
        for metadata in ((), (("authorization", "Bearer old"),), (("authorization", "Bearer old-token2"),),
                         (("authorization", "Basic old-token"),)):
            assert refused(server.port, None, metadata) == grpc.StatusCode.UNAUTHENTICATED
        # Rotation: the old token leaves the file and is refused from then on, without a restart.
        rewrite(tokens, "new-token\n")
        assert refused(server.port, None, (("authorization", "Bearer old-token"),)) == grpc.StatusCode.UNAUTHENTICATED
        assert list_models(server.port, None, (("authorization", "Bearer new-token"),)).models
        # A file emptied by mistake keeps the tokens read before.
        rewrite(tokens, "")
        assert list_models(server.port, None, (("authorization", "Bearer new-token"),)).models


def test_unusable_tls_or_token_files_are_start_up_errors_naming_the_setting(repository, pki, tmp_path):
    with pytest.raises(ConfigError, match="tls_key_file must be set together with tls_cert_file"):
        config(repository, tls_cert_file=str(pki / "server.crt"))
    with pytest.raises(ConfigError, match="tls_client_ca_file must be unset unless tls_cert_file"):
        config(repository, tls_client_ca_file=str(pki / "ca.crt"))
    (tmp_path / "not.pem").write_text("hello")
    cases = [
        (tls(pki) | {"tls_cert_file": str(tmp_path / "missing.crt")}, "tls_cert_file .*missing.crt cannot be read"),
        (tls(pki) | {"tls_key_file": str(tmp_path / "not.pem")}, "tls_key_file .*not.pem is not a PEM file"),
        ({"auth_token_file": str(tmp_path / "none")}, "auth_token_file .*none cannot be read"),
    ]
    for settings, message in cases:
        server = ServerThread(config(repository, **settings))
        with pytest.raises(ConfigError, match=message):
            server.start()
        server.stop()


def test_client_credentials_need_cert_and_key_together(pki):
    with pytest.raises(ClientError, match="--tls-cert and --tls-key go together"):
        channel_credentials(str(pki / "ca.crt"), str(pki / "client.crt"), None)
    assert channel_credentials(None, None, None) is None


def test_the_client_command_speaks_mutual_tls(repository, pki, capsys, monkeypatch):
    with ServerThread(config(repository, **tls(pki, tls_client_ca_file=str(pki / "ca.crt")))) as server:
        target = ["--target", f"127.0.0.1:{server.port}", "--json"]
        assert main([*target, "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"),
                     "--tls-key", str(pki / "client.key"), "models"]) == 0
        assert '"tiny-lm"' in capsys.readouterr().out
        for name, file in (("CA", "ca.crt"), ("CERT", "client.crt"), ("KEY", "client.key")):
            monkeypatch.setenv(f"SEQSERVE_TLS_{name}", str(pki / file))
        assert main([*target, "models"]) == 0
        monkeypatch.delenv("SEQSERVE_TLS_CERT")
        monkeypatch.delenv("SEQSERVE_TLS_KEY")
        assert main([*target, "--timeout", "5", "models"]) == 1  # no client certificate: refused
        assert "UNAVAILABLE" in capsys.readouterr().out
