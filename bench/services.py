"""Real services that tests and benchmarks start for themselves: redis-server and `seqserve serve` processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """Every descendant of `pid` (a server's engine and API processes), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found



class RedisServer:
    """A real `redis-server` (Debian's; `make setup-system` installs it) on a free port in a temp dir, with
    the AOF on and `appendfsync always`, as compose runs it."""

    def __init__(self, directory: Path):
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import redis

        client = redis.Redis(port=self.port)
        give_up = time.monotonic() + 120  # only a broken set-up takes this long: redis answers in milliseconds
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode()}") from None
                if time.monotonic() > give_up:
                    raise RuntimeError("redis-server did not answer PING in 120 s") from None
                time.sleep(0.05)
        self.client = client

    def flush(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=10)


class ServeProcess:
    """`seqserve serve` in a process of its own (so it can be killed with SIGKILL), on port 0; `port` is read
    from its "serving" log line. `env` adds SEQSERVE_* settings."""

    def __init__(self, repository: Path, *, session_store: str, env: dict | None = None, cwd: Path | None = None,
                 port: int = 0, timeout: float = 120.0):
        settings = {**os.environ, "SEQSERVE_INTRA_OP_THREADS": "1", "SEQSERVE_POLL_INTERVAL_SECONDS": "0",
                    "SEQSERVE_METRICS_PORT": "-1", "SEQSERVE_LOG_FORMAT": "json", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "seqserve.cli", "serve", "--repository", str(repository), "--port", str(port),
             "--session-store", session_store], env=settings, cwd=cwd, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)  # its group: the server's processes
        self.log: list[str] = []
        serving = threading.Event()
        self.port = None

        def read() -> None:  # keeps reading, so a chatty server never blocks on a full pipe
            for line in self.process.stderr:
                self.log.append(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "serving":
                    self.port = entry["grpc_port"]
                    serving.set()
            serving.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        serving.wait(timeout)
        if self.port is None:
            self.kill()
            raise RuntimeError("seqserve serve did not start:\n" + "".join(self.log[-30:]))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def events(self) -> list[dict]:
        """Its JSON log entries so far; every one of them once the process has ended."""
        if self.process.poll() is not None:
            self._reader.join(timeout=10)
        entries = []
        for line in list(self.log):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def kill(self) -> None:
        """SIGKILL to every process of the server (the supervisor's process group: an engine process and API
        processes, if it runs several), as when its container is killed: no drain, no flush, nothing any of
        them could still do. Returns once none of them is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:  # the children are reaped by init, a moment later
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.005)
        raise RuntimeError(f"processes of the killed server (group {self.process.pid}) are still there")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except Exception:
                self.kill()
