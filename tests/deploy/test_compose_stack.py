"""docker-compose.yml's `replicas` profile brought up for real: podman-compose (Debian's; docker-compose where
docker is the engine) starts Redis, seqserve-1..3 on this checkout's CPU image, nginx and Prometheus, on
free host ports (the file's GRPC_PORT, ... variables), as one stack for every check below.

Stand-ins: the public images the file names (redis:7.4, nginx:1.27, prom/prometheus:v3.5.0) cannot be pulled
here, so each is built from Debian's package of the same program (tests/deploy/standins/Containerfile: redis 7.0,
nginx 1.22, Prometheus 2.42) and tagged with the name the compose file uses; a real image already present under
that name is used as it is. Grafana has no Debian package: it is left out of this run (the dashboard's queries
are checked against the real Prometheus in test_prometheus_scrape.py and test_dashboard.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request

import grpc
import pytest
import yaml
from container_engine import ROOT

from bench.services import free_port
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(900)  # the session's first test builds the bases and the images

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
REPLICAS = ("seqserve-1", "seqserve-2", "seqserve-3")
SERVICES = ("redis", *REPLICAS, "nginx", "prometheus")  # the `replicas` profile and Prometheus; no Grafana
STANDINS = ("redis", "nginx", "prometheus")  # Containerfile targets, named after the compose services
STANDIN_LABEL = "org.seqserve.test-standin"
LM = "fortunes-lm"
CONVERSATIONS, ROUNDS, KILL_AFTER_ROUND = 4, 3, 0
OPTIONS = pb.DecodingOptions(max_new_tokens=8, min_new_tokens=8)
WORDS = "the cat sat on a mat while the dog ran under a log in the rain".split()


@pytest.fixture(scope="module")
def standin_images(engine) -> dict[str, str]:
    """compose image name -> what runs under it ("stand-in" or "real")."""
    services_base = engine.debian_image(packages="redis-server,nginx,prometheus",
                                        name="localhost/seqserve-test-services")
    used = {}
    for target in STANDINS:
        image = COMPOSE["services"][target]["image"]
        present = engine("image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
        if present.returncode == 0 and STANDIN_LABEL not in (json.loads(present.stdout.strip() or "null") or {}):
            used[image] = "real"
            continue
        flags = ["--format", "docker"] if engine.name == "podman" else []
        engine("build", *flags, "--target", target, "--build-arg", f"SERVICES_IMAGE={services_base}", "--tag", image,
               "--file", str(ROOT / "tests" / "deploy" / "standins" / "Containerfile"),
               str(ROOT / "tests" / "deploy" / "standins"), timeout=600)
        used[image] = "stand-in"
    return used


class Stack:
    def __init__(self, engine, project: str, ports: dict[str, int]):
        self.engine, self.project, self.ports = engine, project, ports

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"  # podman-compose's and docker-compose v1's naming


@pytest.fixture(scope="module")
def stack(engine, cpu_image, standin_images):
    project = f"seqserve-test-{os.getpid()}"
    ports = {name: free_port() for name in ("GRPC_PORT", "METRICS_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT",
                                            "REPLICAS_PORT")}
    env = {name: str(port) for name, port in ports.items()}
    print(f"\ncompose stack {project}: {', '.join(SERVICES)}; images {standin_images}; Grafana left out "
          "(no Debian package)", file=sys.stderr)
    profile = [] if engine.name == "podman" else ["--profile", "replicas"]  # podman-compose 1.0 has no profiles
    running = Stack(engine, project, ports)
    try:
        engine.compose(project, *profile, "up", "-d", "--no-build", *SERVICES, env=env)
        yield running
    finally:
        engine.compose(project, *profile, "down", "-v", env=env, check=False)  # never hides the test's error
        if engine.name == "podman":  # podman-compose 1.0 leaves the project's network behind
            engine("network", "rm", "-f", f"{project}_default", check=False)


def test_three_replicas_turn_healthy(engine, stack):
    for replica in REPLICAS:
        engine.wait_healthy(stack.container(replica))
        if engine.name == "podman":
            assert engine.inspect(stack.container(replica), "{{.State.Health.Status}}") == "healthy"
    assert engine.healthcheck(stack.container("redis"))  # its compose healthcheck: redis-cli ping


def prometheus_targets(port: int) -> dict[str, str]:
    """instance -> health of the seqserve job's active targets, as Prometheus's API reports them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets?state=active", timeout=10) as reply:
        targets = json.load(reply)["data"]["activeTargets"]
    return {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == "seqserve"}


def test_prometheus_reports_every_replica_up(engine, stack):
    for replica in REPLICAS:
        engine.wait_healthy(stack.container(replica))
    wanted = {f"{replica}:9464": "up" for replica in REPLICAS}
    deadline = time.monotonic() + 180  # DNS discovery every 10 s, scrapes every 5 s
    while True:
        try:
            targets = prometheus_targets(stack.ports["PROMETHEUS_PORT"])
        except OSError:
            targets = {}  # Prometheus still starting
        if targets == wanted:
            break
        assert time.monotonic() < deadline, f"Prometheus's seqserve targets: {targets}"
        time.sleep(1)


class Conversation:
    """A session driven through nginx: create, then per round a Feed and a GenerateInSession, every call
    carrying x-session-id (the header nginx hashes on)."""

    def __init__(self, stub, index: int):
        words = WORDS[index:] + WORDS[:index]
        self.stub, self.prefix = stub, " ".join(words[:2])
        self.texts = [" " + " ".join(words[2 + 2 * r: 4 + 2 * r]) for r in range(ROUNDS)]
        self.session_id = stub.CreateSession(pb.CreateSessionRequest(model=LM, prefix=self.prefix),
                                             timeout=60).session_id
        self.outputs: list[list[int]] = []

    def round(self, number: int) -> None:
        metadata = [("x-session-id", self.session_id)]
        self.stub.Feed(pb.FeedRequest(session_id=self.session_id, text=self.texts[number]), metadata=metadata,
                       timeout=60)
        responses = list(self.stub.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=self.session_id, options=OPTIONS), metadata=metadata, timeout=60))
        self.outputs.append([t for r in responses[:-1] for t in r.chunk.token_ids])


def upstreams(engine, stack, session_id: str, calls: int) -> list[str]:
    """The replica addresses nginx sent the session's last `calls` calls to (its access log, on its output;
    "A, B" when it moved on from A), once the log has them."""
    deadline = time.monotonic() + 60
    while True:
        logs = engine("logs", stack.container("nginx"))
        found = re.findall(rf"upstream=([\d.:, ]+?) grpc_status=\S* session={session_id}", logs.stdout + logs.stderr)
        if len(found) >= calls:
            return found[-calls:]
        assert time.monotonic() < deadline, f"nginx logged {len(found)} of the session's {calls} calls"
        time.sleep(0.5)


def test_a_conversation_through_nginx_goes_on_when_its_replicas_container_is_killed(engine, stack, host_stub):
    addresses = {}
    for replica in REPLICAS:
        engine.wait_healthy(stack.container(replica))
        addresses[engine.ip_address(stack.container(replica))] = replica
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['REPLICAS_PORT']}") as channel:
        stub = pb_grpc.SeqserveStub(channel)
        stub.ListModels(pb.ListModelsRequest(), timeout=60, wait_for_ready=True)
        conversations = [Conversation(stub, index) for index in range(CONVERSATIONS)]
        for number in range(KILL_AFTER_ROUND + 1):
            for conversation in conversations:
                conversation.round(number)
        first = conversations[0]
        calls = 2 * (KILL_AFTER_ROUND + 1)  # Feed and GenerateInSession per round
        serving = addresses[upstreams(engine, stack, first.session_id, calls)[-1].split(":")[0]]
        engine("kill", stack.container(serving))
        for number in range(KILL_AFTER_ROUND + 1, ROUNDS):
            for conversation in conversations:
                conversation.round(number)
        if engine.inspect(stack.container(serving), "{{.State.Status}}") != "running":  # not restarted meanwhile
            tried = upstreams(engine, stack, first.session_id, 2 * ROUNDS)[-1]
            assert addresses.get(tried.split(", ")[-1].split(":")[0]) != serving, tried

    references = [Conversation(host_stub, index) for index in range(CONVERSATIONS)]
    for number in range(ROUNDS):
        for reference in references:
            reference.round(number)
    for conversation, reference in zip(conversations, references, strict=True):
        assert conversation.outputs == reference.outputs
        assert all(len(output) == OPTIONS.max_new_tokens for output in conversation.outputs)
