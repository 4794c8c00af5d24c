"""The container engine and the images the container tests share, built once per test session.

The CPU image is built as `make images` builds it (deploy/docker/build-images.sh), on a Debian 12 base made
from Debian's packages (deploy/docker/debian-base.sh), because public base images cannot be pulled here. pip
inside the build reaches the index this machine's pip is configured for through two build secrets: a pip.conf
and the CA bundle pip uses here, each carrying a marker line that test_image.py looks for in every layer.
Both bases and the build's layers stay in the engine's storage, so later sessions rebuild only what changed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from container_engine import ENDLESS_TOKENS, MODELS, PIP_CA_MARKER, PIP_CONF_MARKER, ROOT, Engine, NoEngine, find_engine

from bench.services import ServeProcess
from seqserve.v1 import service_pb2_grpc as pb_grpc

BUILD_IMAGES = ROOT / "deploy" / "docker" / "build-images.sh"
CPU_IMAGE = "seqserve:cpu"  # the name docker-compose.yml gives it: the stack runs this checkout's build
# pip settings worth carrying into the build; file:// indexes and find-links name this machine's disk.
PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "default-timeout", "retries")


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        found = find_engine()
    except NoEngine as reason:
        pytest.skip(str(reason))
    for note in found.notes:
        print(f"\n{note}", file=sys.stderr)
    return found


def pip_settings() -> dict[str, str]:
    """pip's effective configuration on this machine (`pip config list`: files, then PIP_* variables)."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    settings = {}
    for scope, key, value in re.findall(r"^([\w:]+)\.([\w-]+)='(.*)'$", listing, flags=re.M):
        if scope in ("global", "install", ":env:"):
            settings[key] = value
    return settings


@pytest.fixture(scope="session")
def pip_secrets(tmp_path_factory) -> dict[str, Path]:
    """The build secrets: a pip.conf with this machine's network settings, and the CA bundle pip uses here."""
    directory = tmp_path_factory.mktemp("pip-secrets")
    settings = pip_settings()
    lines = [PIP_CONF_MARKER, "[global]"]
    for key in PIP_KEYS:
        value = " ".join(v for v in settings.get(key, "").split() if not v.startswith("file:"))
        if value:
            lines.append(f"{key} = {value}")
    conf = directory / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    ca_source = Path(settings.get("cert") or "/etc/ssl/certs/ca-certificates.crt")
    if not ca_source.exists():  # no system bundle: pip's own
        from pip._vendor import certifi

        ca_source = Path(certifi.where())
    ca = directory / "pip-ca.pem"
    ca.write_text(PIP_CA_MARKER + "\n" + ca_source.read_text())  # text outside the PEM blocks is ignored
    return {"pip.conf": conf, "pip-ca": ca}


@pytest.fixture(scope="session")
def cpu_image(engine, pip_secrets) -> str:
    """`make images IMAGES=cpu PYTHON_IMAGE=<the Debian base> PIP_CONFIG=... PIP_CA=...` for this checkout."""
    env = {**engine.env, "ENGINE": engine.name, "IMAGES": "cpu", "TAG": CPU_IMAGE.split(":")[0],
           "PYTHON_IMAGE": engine.base_image, "PIP_CONFIG": str(pip_secrets["pip.conf"]),
           "PIP_CA": str(pip_secrets["pip-ca"])}
    result = subprocess.run([str(BUILD_IMAGES)], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"make images failed:\n{(result.stdout + result.stderr)[-5000:]}"
    return CPU_IMAGE


@pytest.fixture(scope="session")
def host_stub():
    """`seqserve serve` on the host, on the repository the containers serve: the answers to compare with."""
    server = ServeProcess(MODELS, session_store="memory", env={"SEQSERVE_MAX_NEW_TOKENS": str(ENDLESS_TOKENS)})
    channel = grpc.insecure_channel(server.target)
    try:
        yield pb_grpc.SeqserveStub(channel)
    finally:
        channel.close()
        server.stop()
