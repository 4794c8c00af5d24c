"""A real container engine for the image and compose tests: podman (or docker), found once per test session.

Which engine: CONTAINER_ENGINE=podman|docker when set, otherwise podman, then docker; the first whose
`info` answers and that runs a container from the local Debian base is used. podman needs no daemon and
`make setup-system` installs it; docker is tried where its daemon runs (Debian's docker.io installs the
daemon but does not start it here). None able to run a container: the tests skip, naming each reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_BASE = ROOT / "deploy" / "docker" / "debian-base.sh"
RLIMIT_CONF = ROOT / "deploy" / "podman" / "containers.conf"
MODELS = ROOT / "models"  # the repository the images serve in these tests (mounted read-only)
ENDLESS_TOKENS = 1_000_000  # the servers' max_new_tokens here: no machine reaches it, only a test ends such a stream
# The first line of each build secret the tests pass (conftest.py); test_image.py looks for them in every layer.
PIP_CONF_MARKER = "# seqserve-test-secret: this pip.conf is a build secret and must never reach an image layer"
PIP_CA_MARKER = "# seqserve-test-secret: this CA bundle is a build secret and must never reach an image layer"


class NoEngine(Exception):
    """No container engine can run a container here; the message says why, engine by engine."""


@dataclass
class Engine:
    name: str  # "podman" or "docker"
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    base_image: str = ""  # the local Debian base, built by deploy/docker/debian-base.sh
    notes: list[str] = field(default_factory=list)

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([self.name, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def inspect(self, name: str, template: str, kind: str = "container") -> str:
        return self(kind, "inspect", "--format", template, name).stdout.strip()

    def debian_image(self, packages: str = "", name: str = "") -> str:
        """A Debian 12 image from Debian's packages (cached by recipe): the Python base, or `packages`."""
        env = {**self.env, "ENGINE": self.name}
        if packages:
            env |= {"PACKAGES": packages, "NAME": name}
        result = subprocess.run([str(DEBIAN_BASE)], env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise AssertionError(f"{DEBIAN_BASE.name} failed:\n{result.stderr[-3000:]}")
        return result.stdout.split()[-1]

    def healthcheck(self, container: str) -> bool:
        """Run the container's HEALTHCHECK command now: podman runs it (and records the status); docker has
        no such command, so the image's own test command runs inside the container."""
        if self.name == "podman":
            return self("healthcheck", "run", container, check=False).returncode == 0
        test = json.loads(self.inspect(container, "{{json .Config.Healthcheck.Test}}"))
        assert test and test[0] == "CMD", test
        return self("exec", container, *test[1:], check=False).returncode == 0

    def wait_healthy(self, container: str, timeout: float = 240) -> None:
        """Until the health check passes; `timeout` only bounds a container that never loads its models."""
        deadline = time.monotonic() + timeout
        while not self.healthcheck(container):
            running = self.inspect(container, "{{.State.Running}}")
            if running != "true":
                logs = self("logs", container, check=False)
                raise AssertionError(f"{container} stopped:\n{(logs.stdout + logs.stderr)[-3000:]}")
            assert time.monotonic() < deadline, f"{container} not healthy after {timeout:.0f} s"
            time.sleep(1)

    def ip_address(self, container: str) -> str:
        return self.inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")

    def compose(self, project: str, *args: str, env: dict[str, str] | None = None, check: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess:
        """podman-compose (Debian's) or docker-compose on docker-compose.yml, as project `project`."""
        binary = {"podman": "podman-compose", "docker": "docker-compose"}[self.name]
        if shutil.which(binary) is None:
            raise AssertionError(f"{binary} is not installed (`make setup-system` installs it)")
        result = subprocess.run([binary, "-p", project, "-f", str(ROOT / "docker-compose.yml"), *args], cwd=ROOT,
                                env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{binary} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result


def find_engine() -> Engine:
    """The first engine that runs a container from the local Debian base; NoEngine names each failure."""
    asked = os.environ.get("CONTAINER_ENGINE")
    reasons = []
    for name in [asked] if asked else ["podman", "docker"]:
        if shutil.which(name) is None:
            reasons.append(f"{name}: not installed")
            continue
        engine = Engine(name)
        info = engine("info", check=False, timeout=120)
        if info.returncode != 0:
            reasons.append(f"{name}: `{name} info` failed: {(info.stderr or info.stdout).strip()[-300:]}")
            continue
        engine.base_image = engine.debian_image()
        failure = _run_probe(engine)
        if failure and name == "podman" and "error setting rlimits" in failure:
            engine.env["CONTAINERS_CONF"] = str(RLIMIT_CONF)
            engine.notes.append(f"podman cannot raise containers' open-files limit here: CONTAINERS_CONF={RLIMIT_CONF}")
            failure = _run_probe(engine)
        if failure:
            reasons.append(f"{name}: cannot run a container: {failure[-300:]}")
            continue
        return engine
    raise NoEngine("no container engine can run a container here (" + "; ".join(reasons) + ")")


def _run_probe(engine: Engine) -> str:
    """'' when `run` works, else its error."""
    result = engine("run", "--rm", "--pull=never", engine.base_image, "true", check=False, timeout=120)
    return "" if result.returncode == 0 else (result.stderr or result.stdout).strip()
