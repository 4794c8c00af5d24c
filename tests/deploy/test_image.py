"""The CPU image, built by `make images` on a local Debian base and run on a real container engine (podman
here, docker where its daemon runs; container_engine.py says how one is picked), as `docker run` users run it:
the repository's models/ mounted read-only, a named volume for state/ (the default SQLite session store).

It keeps no build secret in any layer, runs as uid 10001, its HEALTHCHECK reports healthy, it answers Translate
and Generate exactly as `seqserve serve` on the host does, a session acknowledged before `kill` is there after
`start`, and SIGTERM drains it: new calls refused, the in-flight stream served on, exit code 0 before compose's
stop_grace_period would have ended it with SIGKILL. The tests look only at behaviour (health, answers, drain,
exit code), so they hold however many processes `seqserve serve` runs inside.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import threading

import grpc
import pytest
import yaml
from container_engine import ENDLESS_TOKENS, MODELS, PIP_CA_MARKER, PIP_CONF_MARKER, ROOT
from live import Reader, wait_for

from bench.services import free_port
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.config import load_config

pytestmark = pytest.mark.timeout(900)  # the session's first test builds the bases and the image

LM, G2P = "fortunes-lm", "g2p-en"
WORDS = ["container", "tomato", "seqserve", "kubernetes", "pronunciation"]


def stop_grace_seconds() -> int:
    """docker-compose.yml's stop_grace_period for seqserve ("40s"): how long compose waits before SIGKILL."""
    period = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["seqserve"]["stop_grace_period"]
    (seconds,) = re.fullmatch(r"(\d+)s", period).groups()
    return int(seconds)


class Container:
    """`ENGINE run -d` of the image with the models read-only, a state volume and the gRPC port on 127.0.0.1."""

    def __init__(self, engine, image: str):
        self.engine, self.image = engine, image
        self.name = f"seqserve-test-{os.getpid()}"
        self.volume = f"{self.name}-state"
        self.port = free_port()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.SeqserveStub(self.channel)

    def run(self) -> None:
        self.engine("volume", "create", self.volume)
        self.engine("run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:50051",
                    "-v", f"{MODELS}:/models:ro", "-v", f"{self.volume}:/home/seqserve/state",
                    "-e", f"SEQSERVE_MAX_NEW_TOKENS={ENDLESS_TOKENS}", self.image)

    def wait_serving(self) -> None:
        self.engine.wait_healthy(self.name)
        grpc.channel_ready_future(self.channel).result(timeout=60)  # the published port, from the host

    def remove(self) -> None:
        self.channel.close()
        self.engine("rm", "-f", self.name, check=False)
        self.engine("volume", "rm", "-f", self.volume, check=False)


@pytest.fixture(scope="module")
def container(engine, cpu_image):
    running = Container(engine, cpu_image)
    try:
        running.run()
        running.wait_serving()
        yield running
    finally:
        running.remove()


# --- the build ----------------------------------------------------------------------------------------------


def scan(stream, needles: list[bytes], found: set[bytes], chunk: int = 1 << 20) -> None:
    """Add to `found` every needle the stream's bytes contain (chunks overlap, so none is cut in two)."""
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    while block := stream.read(chunk):
        window = tail + block
        found.update(n for n in needles if n in window)
        tail = window[-overlap:]


def test_no_layer_of_the_image_holds_the_build_secrets(engine, cpu_image, pip_secrets, tmp_path):
    """pip.conf and the CA bundle were mounted as secrets for the pip steps (on this machine the build
    needs the CA to reach the index at all), and neither the files nor their text is in any layer, in the
    image's history or in its configuration."""
    needles = [PIP_CONF_MARKER.encode(), PIP_CA_MARKER.encode()]
    archive = tmp_path / "image.tar"
    engine("save", "-o", str(archive), cpu_image, timeout=600)
    try:
        layers, secret_files, found = read_layers(archive, needles)
    finally:
        archive.unlink()  # pytest keeps the last sessions' temporary files: not 700 MB of them
    history = engine("history", "--no-trunc", "--format", "{{.CreatedBy}}", cpu_image).stdout
    found.update(n for n in needles if n in history.encode())
    assert layers >= 5, f"only {layers} layers read from the saved image"
    assert not found, f"build secrets in the image: {found}"
    assert not secret_files, f"files left under /run/secrets: {secret_files}"
    for path in pip_secrets.values():  # the test's secrets did carry the markers
        assert path.read_text().startswith("# seqserve-test-secret:")


def read_layers(archive, needles: list[bytes]) -> tuple[int, list[str], set[bytes]]:
    """Every layer of a saved image (`save -o`: docker-archive or OCI layout, layers as plain tars), file by
    file, and its other members (configuration, history, manifest) as bytes: (layers read, non-empty files
    under run/secrets/, the needles found)."""
    found: set[bytes] = set()
    layers, secret_files = 0, []
    with tarfile.open(archive) as outer:
        for member in outer:
            if not member.isfile():
                continue
            if _is_tar(outer.extractfile(member)):
                layers += 1
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as layer:
                    for entry in layer:
                        if entry.isfile() and entry.name.lstrip("./").startswith("run/secrets/") and entry.size:
                            secret_files.append(entry.name)
                        if entry.isfile():
                            scan(layer.extractfile(entry), needles, found)
            else:
                scan(outer.extractfile(member), needles, found)
    return layers, secret_files, found


def _is_tar(stream) -> bool:
    header = stream.read(512)
    return len(header) == 512 and header[257:262] == b"ustar"


# --- the running container ----------------------------------------------------------------------------------


def test_it_runs_as_uid_10001_with_read_only_models_and_reports_healthy(engine, container):
    name = container.name
    status = engine("exec", name, "cat", "/proc/1/status").stdout  # the server itself, PID 1
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, flags=re.M), status
    denied = engine("exec", name, "touch", "/models/written-by-the-container", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert not (MODELS / "written-by-the-container").exists()
    mounts = json.loads(engine.inspect(name, "{{json .Mounts}}"))
    state = next(m for m in mounts if m["Destination"] == "/home/seqserve/state")
    assert state["Type"] == "volume" and state["Name"] == container.volume
    # The default session store lives on that volume, written by the non-root user.
    listing = engine("exec", name, "ls", "-ln", "/home/seqserve/state").stdout
    assert re.search(r"^-rw\S*\s+\d+\s+10001\s+\d+\s+.*sessions\.db$", listing, flags=re.M), listing
    assert engine.healthcheck(name)
    if engine.name == "podman":  # `healthcheck run` records its result as docker's daemon would
        assert engine.inspect(name, "{{.State.Health.Status}}") == "healthy"


def test_translate_and_generate_answers_equal_the_host_servers(container, host_stub):
    requests = [
        pb.TranslateRequest(model=G2P, sources=WORDS),
        pb.TranslateRequest(model=G2P, sources=WORDS[:3], options=pb.DecodingOptions(
            strategy=pb.DecodingOptions.STRATEGY_BEAM, beam_size=5, n_best=3)),
    ]
    for request in requests:
        ours, theirs = container.stub.Translate(request), host_stub.Translate(request)
        assert [[(h.text, list(h.token_ids)) for h in t.hypotheses] for t in ours.translations] == \
               [[(h.text, list(h.token_ids)) for h in t.hypotheses] for t in theirs.translations]
        for mine, reference in zip(ours.translations, theirs.translations, strict=True):
            assert [h.score for h in mine.hypotheses] == pytest.approx([h.score for h in reference.hypotheses],
                                                                       rel=1e-4, abs=1e-4)
    assert ours.translations[0].hypotheses[0].text  # a real answer, not an empty one
    generations = [
        pb.GenerateRequest(model=LM, prompt="The meaning of life", options=pb.DecodingOptions(max_new_tokens=60)),
        pb.GenerateRequest(model=LM, prompt="Love is", options=pb.DecodingOptions(
            strategy=pb.DecodingOptions.STRATEGY_SAMPLE, temperature=0.8, top_p=0.95, seed=7, max_new_tokens=60)),
    ]
    for request in generations:
        ours, theirs = list(container.stub.Generate(request)), list(host_stub.Generate(request))
        tokens = [[t for r in responses[:-1] for t in r.chunk.token_ids] for responses in (ours, theirs)]
        assert tokens[0] == tokens[1] and len(tokens[0]) > 10
        assert ours[-1].done.text == theirs[-1].done.text


def session_continuation(stub, session_id: str) -> list[int]:
    responses = list(stub.GenerateInSession(pb.GenerateInSessionRequest(
        session_id=session_id, options=pb.DecodingOptions(max_new_tokens=20, min_new_tokens=20))))
    return [t for r in responses[:-1] for t in r.chunk.token_ids]


def test_a_session_acknowledged_before_kill_is_there_after_start(engine, container, host_stub):
    """SIGKILL (no drain, nothing flushed at exit), then `start`: the session is read back from the SQLite
    file on the state volume and continues exactly as the same session on the host server does."""
    sessions = []
    for stub in (container.stub, host_stub):
        session = stub.CreateSession(pb.CreateSessionRequest(model=LM, prefix="The cat"))
        fed = stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" sat on the mat, and"))
        sessions.append((session.session_id, fed.tokens_consumed))
    (session_id, acknowledged), (host_session, host_acknowledged) = sessions
    assert acknowledged == host_acknowledged > 0

    engine("kill", container.name)
    engine("wait", container.name, timeout=120)
    assert engine.inspect(container.name, "{{.State.Running}}") == "false"
    engine("start", container.name)
    container.wait_serving()

    again = container.stub.GetSession(pb.GetSessionRequest(session_id=session_id), wait_for_ready=True)
    assert again.tokens_consumed == acknowledged
    assert session_continuation(container.stub, session_id) == session_continuation(host_stub, host_session)


def test_sigterm_drains_and_the_container_exits_0_within_its_stop_grace_period(engine, container):
    """`stop -t <stop_grace_period>` sends SIGTERM: the health check fails (NOT_SERVING), new calls get
    UNAVAILABLE, the in-flight stream keeps streaming; once the client ends it the server exits 0, before the
    engine's SIGKILL (which would make the exit code 137)."""
    grace = stop_grace_seconds()
    # The server gives up on in-flight calls after drain_grace_seconds, before compose would kill it, so
    # even a stream that never ends lets it exit 0 (here the test ends the stream sooner).
    assert load_config(env={}).drain_grace_seconds < grace
    held = container.stub.Generate(pb.GenerateRequest(model=LM, prompt="Once", options=pb.DecodingOptions(
        max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)))
    next(held)
    reader = Reader(held)
    stopped = {}
    stopper = threading.Thread(target=lambda: stopped.update(result=engine(
        "stop", "-t", str(grace), container.name, check=False, timeout=grace + 120)), daemon=True)
    stopper.start()

    def refused() -> bool:
        try:
            list(container.stub.Generate(pb.GenerateRequest(model=LM, prompt="a", options=pb.DecodingOptions(
                max_new_tokens=1)), timeout=10))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return True
        return False

    wait_for(refused, timeout=120, what="new calls to be refused")
    assert not engine.healthcheck(container.name)  # NOT_SERVING while it drains
    streamed = len(reader.responses)
    wait_for(lambda: len(reader.responses) > streamed + 20, timeout=120,
             what="the in-flight stream to go on during the drain")
    # Still up (podman says "stopping" while its stop command waits, docker "running").
    assert engine.inspect(container.name, "{{.State.Status}}") in ("running", "stopping") and stopper.is_alive()
    held.cancel()  # the drain can end now
    stopper.join(timeout=grace + 120)
    assert stopped["result"].returncode == 0, stopped["result"].stderr
    assert engine.inspect(container.name, "{{.State.ExitCode}}") == "0"
    assert reader.error is not None and reader.error.code() == grpc.StatusCode.CANCELLED
