"""deploy/nginx/nginx.conf in front of three `seqserve serve` replicas on one redis-server, all real
processes: conversations run through nginx (hashing on x-session-id); the replica serving one of them is
killed with SIGKILL mid-conversation, later another one drains (SIGTERM) and exits; every conversation
continues on another replica, and every output equals a single-server run of the same conversations token
for token."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from bench.services import ServeProcess, free_port
from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
CONVERSATIONS, ROUNDS, KILL_AFTER_ROUND, DRAIN_AFTER_ROUND = 6, 4, 1, 2
OPTIONS = pb.DecodingOptions(max_new_tokens=6, min_new_tokens=6)
WORDS = "the cat sat on a mat dog ran under log big small red blue".split()


def nginx_config(upstream_ports: list[int], port: int, directory: Path) -> str:
    """The deploy file with the test's addresses, and its paths in `directory` (nothing else changed)."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^\s*server seqserve-\d:50051 .*;$", text, flags=re.M)
    assert len(servers) == 3, "the deploy file lists three replicas"
    for line, upstream in zip(servers, upstream_ports, strict=True):
        text = text.replace(line, re.sub(r"seqserve-\d:50051", f"127.0.0.1:{upstream}", line))
    text = text.replace("listen 50051 http2;", f"listen 127.0.0.1:{port} http2;")
    text = text.replace("/var/log/nginx/access.log", str(directory / "access.log"))
    temp = " ".join(f"{kind}_temp_path {directory}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                       "scgi"))
    text = text.replace("http {", f"http {{\n    {temp}", 1)
    return f"pid {directory}/nginx.pid;\nerror_log {directory}/error.log warn;\n" + text


def script(index: int) -> tuple[str, list[str]]:
    """Conversation `index`: its prefix and one text per round."""
    words = WORDS[index:] + WORDS[:index]
    return " ".join(words[:2]), [" " + " ".join(words[2 + 2 * r: 4 + 2 * r]) for r in range(ROUNDS)]


class Conversation:
    def __init__(self, stub, index: int):
        self.stub, self.index = stub, index
        self.prefix, self.texts = script(index)
        self.session_id = stub.CreateSession(pb.CreateSessionRequest(model="tiny-lm", prefix=self.prefix)).session_id
        self.outputs: list[list[int]] = []

    def round(self, number: int) -> None:
        metadata = [("x-session-id", self.session_id)]
        self.stub.Feed(pb.FeedRequest(session_id=self.session_id, text=self.texts[number]), metadata=metadata)
        responses = list(self.stub.GenerateInSession(pb.GenerateInSessionRequest(
            session_id=self.session_id, options=OPTIONS), metadata=metadata))
        self.outputs.append([t for r in responses[:-1] for t in r.chunk.token_ids])


@pytest.fixture(scope="module")
def repository(tiny_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("replica-models")
    export_run(tiny_runs["lstm", "lm"], root, "tiny-lm", version=1, options=ExportOptions(
        eval_limit=10, real_inputs=50, parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10)))
    return root


def upstream_of(log: Path, session_id: str) -> list[str]:
    """The replicas nginx sent the session's calls to, in order (from its access log)."""
    return re.findall(rf"upstream=([\d.:, ]+?) grpc_status=\S* session={session_id}", log.read_text())


def test_conversations_survive_the_death_of_their_replica(repository, redis_server, tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: `make setup-system` installs the Debian package")
    redis_server.flush()
    replicas = [ServeProcess(repository, session_store=redis_server.url) for _ in range(3)]
    port = free_port()
    (tmp_path / "nginx.conf").write_text(nginx_config([r.port for r in replicas], port, tmp_path))
    proxy = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                             stderr=subprocess.PIPE, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        time.sleep(0.2)
        assert proxy.poll() is None, f"nginx exited: {proxy.stderr.read()}"
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.SeqserveStub(channel)
        for _ in range(100):  # nginx takes a moment to accept after its port opens
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=5)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        conversations = [Conversation(stub, index) for index in range(CONVERSATIONS)]
        for number in range(KILL_AFTER_ROUND + 1):
            for conversation in conversations:
                conversation.round(number)
        log = tmp_path / "access.log"
        first = conversations[0]
        serving = upstream_of(log, first.session_id)[-1]
        victim = next(r for r in replicas if serving.endswith(f":{r.port}"))
        victim.kill()
        for number in range(KILL_AFTER_ROUND + 1, DRAIN_AFTER_ROUND + 1):
            for conversation in conversations:
                conversation.round(number)
        # The victim's conversation moved: its later calls were answered by another replica.
        later = upstream_of(log, first.session_id)[-1]
        assert not later.endswith(f":{victim.port}"), later
        # A replica that drains (SIGTERM) and exits: its conversations continue on the last one.
        drained = next(r for r in replicas if later.endswith(f":{r.port}"))
        drained.stop()
        assert drained.process.returncode == 0
        for number in range(DRAIN_AFTER_ROUND + 1, ROUNDS):
            for conversation in conversations:
                conversation.round(number)
        survivor = next(r for r in replicas if r not in (victim, drained))
        assert upstream_of(log, first.session_id)[-1].endswith(f":{survivor.port}")
    finally:
        channel.close()
        proxy.terminate()
        proxy.wait(timeout=30)
        for replica in replicas:
            replica.stop()

    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          log_level="warning")
    with ServerThread(config) as single, grpc.insecure_channel(f"127.0.0.1:{single.port}") as direct:
        references = [Conversation(pb_grpc.SeqserveStub(direct), index) for index in range(CONVERSATIONS)]
        for number in range(ROUNDS):
            for reference in references:
                reference.round(number)
    for conversation, reference in zip(conversations, references, strict=True):
        assert conversation.outputs == reference.outputs
