"""docker-compose.yml, deploy/compose.gpu.yml, the Dockerfiles, the image health check and prometheus.yml:
valid for the tools that read them, and wired to each other and to the server's settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

from bench.services import free_port
from server.config import ENV_PREFIX, ServerConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "compose.gpu.yml"
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
HEALTHCHECK = DOCKER / "healthcheck.py"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ENTRYPOINT = '["seqserve", "serve", "--repository", "/models", "--host", "0.0.0.0"]'


def load_yaml(path: Path) -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with tokenizers' huggingface_hub) reads it")
    return yaml.safe_load(path.read_text())


def compose(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian package `docker-compose`, from `make setup-system`)")
    return subprocess.run([binary, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


# --- compose files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "cpu+gpu-override"])
def test_compose_config_is_valid(files):
    args = [arg for path in files for arg in ("-f", str(path.relative_to(ROOT)))]
    result = compose(*args, "config")
    assert result.returncode == 0, result.stderr
    services = compose(*args, "config", "--services")
    assert services.returncode == 0, services.stderr
    # docker-compose 1.29's `config` lists every service; those of a profile (replicas) start only with it.
    profiled = {name for name, service in load_yaml(COMPOSE)["services"].items() if service.get("profiles")}
    assert set(services.stdout.split()) - profiled == {"seqserve", "prometheus", "grafana"}
    if COMPOSE_GPU in files:  # the override's additions survive the merge
        assert "Dockerfile.gpu" in result.stdout and "driver: nvidia" in result.stdout


def test_seqserve_service_serves_the_mounted_repository():
    service = load_yaml(COMPOSE)["services"]["seqserve"]
    assert service["build"] == {"context": ".", "dockerfile": "deploy/docker/Dockerfile.cpu"}
    # Host ports default to the server's and can be moved (GRPC_PORT, METRICS_PORT), as the stack test does.
    assert {"${GRPC_PORT:-50051}:50051", "${METRICS_PORT:-9464}:9464"} <= set(service["ports"])
    assert "./models:/models:ro" in service["volumes"]
    assert service["environment"]["SEQSERVE_REPOSITORY"] == "/models"
    assert "/opt/seqserve/healthcheck.py" in service["healthcheck"]["test"]


def test_gpu_override_uses_the_gpu_image_and_reserves_a_gpu():
    service = load_yaml(COMPOSE_GPU)["services"]["seqserve"]
    assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert service["environment"]["SEQSERVE_PROVIDERS"].startswith("CUDAExecutionProvider")


def test_prometheus_and_grafana_are_wired_to_the_repository_files():
    services = load_yaml(COMPOSE)["services"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for service in services.values():  # Docker would mount a missing file as an empty directory
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./deploy/"):
                assert (ROOT / source).exists(), f"{source} is missing"


def env_settings() -> dict[str, str]:
    """Every SEQSERVE_* variable the compose files and the images set."""
    settings = {}
    for path in (COMPOSE, COMPOSE_GPU):
        for service in load_yaml(path)["services"].values():
            settings |= {k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith(ENV_PREFIX)}
    for path in DOCKERFILES.values():
        settings |= dict(re.findall(r"\b(SEQSERVE_[A-Z_]+)=(\S+)", path.read_text()))
    return settings


def test_every_seqserve_variable_is_a_setting_the_server_accepts():
    """An unknown SEQSERVE_* name or a bad value stops the server at start, so check them here."""
    settings = env_settings()
    assert "SEQSERVE_REPOSITORY" in settings and "SEQSERVE_PROVIDERS" in settings
    config = load_config(env=settings)  # raises ConfigError naming the variable
    assert isinstance(config, ServerConfig) and config.repository == "/models"


# --- images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_runs_the_server_as_a_non_root_user_with_a_health_check(kind):
    text = DOCKERFILES[kind].read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the runtime stage runs as a non-root user"
    assert re.search(r"^EXPOSE\s+50051\s+9464\s*$", text, re.MULTILINE)
    assert "COPY deploy/docker/healthcheck.py /opt/seqserve/healthcheck.py" in text
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD \[.*/opt/seqserve/healthcheck.py\"\]", text, re.MULTILINE)
    assert f"ENTRYPOINT {ENTRYPOINT}" in text
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "pip install" in instructions and "torch" not in instructions  # the base install: no torch
    if kind == "gpu":
        assert re.search(r"^ARG CUDA_IMAGE=docker\.io/nvidia/cuda:[\d.]+-cudnn-runtime-", text, re.MULTILINE)
    else:
        assert re.search(r"^ARG PYTHON_IMAGE=docker\.io/library/python:3\.\d+-slim", text, re.MULTILINE)
    # pip's configuration and CA bundle reach pip only as build secrets, in every stage that runs pip.
    for run in re.findall(r"^RUN (?:.*\\\n)*.*$", instructions, re.MULTILINE):
        if re.search(r"\bpip (install -r|wheel)\b", run):
            assert "--mount=type=secret,id=pip.conf" in run and "--mount=type=secret,id=pip-ca" in run, run


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "data", "models", "**/__pycache__"} <= ignored
    assert not {"pyproject.toml", "README.md", "server", "seqserve"} & ignored  # `pip install .` needs them


# --- the image's health check against a real health service -------------------------------------------------


@pytest.fixture
def health_server():
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def run_healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30)


def test_healthcheck_exits_0_only_while_serving(health_server):
    from grpc_health.v1 import health_pb2

    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = run_healthcheck(target)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr

    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # draining
    result = run_healthcheck(target)
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout

    result = run_healthcheck(target, "seqserve.v1.Seqserve/no-such-model")
    assert result.returncode == 1 and "NOT_FOUND" in result.stdout


def test_healthcheck_fails_when_nothing_listens():
    result = run_healthcheck(f"127.0.0.1:{free_port()}")  # a port that was free a moment ago
    assert result.returncode == 1 and "UNAVAILABLE" in result.stdout, result.stdout + result.stderr


# --- Prometheus ---------------------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`, from `make setup-system`)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_seqserve_service_every_5_seconds():
    (job,) = [job for job in load_yaml(PROMETHEUS)["scrape_configs"] if job["job_name"] == "seqserve"]
    assert job["scrape_interval"] == "5s" and job.get("metrics_path", "/metrics") == "/metrics"
    # Every compose service that runs seqserve, found by DNS name on the server's metrics port.
    (discovery,) = job["dns_sd_configs"]
    servers = {name for name, service in load_yaml(COMPOSE)["services"].items()
               if service.get("build", {}).get("dockerfile") == "deploy/docker/Dockerfile.cpu"}
    assert servers == {"seqserve", "seqserve-1", "seqserve-2", "seqserve-3"}
    assert set(discovery["names"]) == servers and len(discovery["names"]) == len(servers)
    assert (discovery["type"], discovery["port"]) == ("A", ServerConfig().metrics_port)
