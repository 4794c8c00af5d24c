"""The replicas' deployment files: docker-compose.yml's `replicas` profile and deploy/k8s/, valid for the
tools that read them and wired to each other, to deploy/nginx/nginx.conf and to the server's settings.
(nginx itself in front of real replicas: test_nginx_replicas.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from server.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
REPLICAS = ("seqserve-1", "seqserve-2", "seqserve-3")


def load_yaml_all(path: Path) -> list[dict]:
    import yaml

    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def test_the_replicas_profile_is_valid_and_wired():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed (Debian package `docker-compose`, from `make setup-system`)")
    result = subprocess.run([binary, "--profile", "replicas", "config"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    services = load_yaml_all(COMPOSE)[0]["services"]
    profiled = {name for name, service in services.items() if "replicas" in service.get("profiles", ())}
    assert profiled == {"redis", "nginx", *REPLICAS}
    assert "--appendfsync" in services["redis"]["command"] and "always" in services["redis"]["command"]
    for name in REPLICAS:
        environment = services[name]["environment"]
        assert environment["SEQSERVE_SESSION_STORE"] == "redis://redis:6379/0"
        load_config(env=environment)  # every variable is a setting the server knows
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    upstreams = re.findall(r"^\s*server (\S+):50051 ", NGINX_CONF.read_text(), flags=re.M)
    assert upstreams == list(REPLICAS)  # nginx's upstreams are the compose services
    assert "hash $http_x_session_id consistent;" in NGINX_CONF.read_text()
    # The single server keeps its sessions in the default SQLite file, on a volume.
    assert "seqserve-state:/home/seqserve/state" in services["seqserve"]["volumes"]


def test_the_k8s_manifests_validate_against_the_kubernetes_schemas():
    import sys

    files = sorted(str(path) for path in K8S.glob("*.yaml"))
    # The dev extra's kubernetes-validate: the API's published schemas, offline (no cluster needed).
    result = subprocess.run([sys.executable, "-c", "from kubernetes_validate.__main__ import main; main()",
                             "--strict", *files], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") + result.stderr.count("passed") == 4


def test_the_k8s_manifests_are_wired_to_each_other_and_to_the_server():
    documents = {(d["kind"], d["metadata"]["name"]): d for path in K8S.glob("*.yaml") for d in load_yaml_all(path)}
    deployment = documents["Deployment", "seqserve"]
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"] == 50051
    environment = {item["name"]: item.get("value", "") for item in container["env"]}
    load_config(env={k: v for k, v in environment.items() if v})
    store = environment["SEQSERVE_SESSION_STORE"]
    redis_service = documents["Service", "seqserve-redis"]
    assert store == f"redis://{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}/0"
    redis = documents["StatefulSet", "seqserve-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert ["--appendfsync", "always"] == redis["args"][2:4]
    service = documents["Service", "seqserve"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        load_config(env={}).drain_grace_seconds


def test_kubectl_accepts_the_manifests_when_a_cluster_is_reachable():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    reachable = subprocess.run([kubectl, "version", "--request-timeout=5s"], capture_output=True, timeout=60)
    if reachable.returncode != 0:
        pytest.skip("no Kubernetes API server reachable: `kubectl apply --dry-run=client` needs one for discovery")
    result = subprocess.run([kubectl, "apply", "--dry-run=client", "-f", str(K8S)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
