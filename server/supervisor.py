"""`seqserve serve` with several API processes: the supervisor, and the entry point of the processes it runs.

    supervisor (this module; no gRPC, no model)   the port, /metrics, restarts, the drain
      |- engine process   (server.engine_process)  models, ONNX Runtime, scheduler, sessions and their store
      |- API process 0    (server.app.App + server.api.engine_link)  gRPC, TLS, auth, both APIs,
      |- API process 1     ...                                        tokenization, detokenization
      ...                 all on one port (SO_REUSEPORT: the kernel spreads connections over them)

The supervisor takes the port first (a free one for port 0) and keeps it with a socket that never
listens, so nobody else can take it while the API processes start or restart; it starts the engine
process, then the API processes once the engine answers, and logs the "serving" line when all serve.
A process that dies is started again (an API process's calls die with it; while the engine process is
away every call is UNAVAILABLE, and the sessions it acknowledged are in the store). SIGTERM drains: the
API processes first (health NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish within
`drain_grace_seconds`), then the engine process; exit status 0. Metrics: every process writes its values
in `PROMETHEUS_MULTIPROC_DIR` (a directory of the runtime), and the supervisor's /metrics adds them up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from server.config import ConfigError, ServerConfig
from server.errors import StartupError

logger = logging.getLogger("server.supervisor")

ENGINE = "engine"
RESTART_BACKOFF = (0.1, 5.0)  # seconds before a dead process is started again: first, at most (doubling)
STEADY_SECONDS = 30.0  # a process up this long has its backoff reset
STOP_MARGIN_SECONDS = 15.0  # beyond the drain grace, before a process that does not exit is killed


class Supervisor:
    """Runs one engine process and `config.resolved_api_processes()` API processes until SIGTERM."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.count = config.resolved_api_processes()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._runtime: Path | None = None
        self._holder: socket.socket | None = None
        self._children: dict[str, _Child] = {}
        self._draining = False
        self._metrics_http = None

    async def run(self) -> int:
        self._runtime = Path(tempfile.mkdtemp(prefix="seqserve-"))  # 0700: the IPC socket and config live here
        try:
            return await self._run()
        finally:
            for child in self._children.values():
                child.kill()
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
            if self._holder is not None:
                self._holder.close()
            shutil.rmtree(self._runtime, ignore_errors=True)

    async def _run(self) -> int:
        config = self.config
        _check_files(config)  # a bad TLS or token file is a start-up error here, before any process starts
        self._holder, self.port = hold_port(config.host, config.port)
        metrics_dir = self._runtime / "metrics"
        metrics_dir.mkdir()
        child_config = dataclasses.replace(config, port=self.port)
        (self._runtime / "config.json").write_text(json.dumps(dataclasses.asdict(child_config)))
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        roles = [ENGINE, *(f"api-{i}" for i in range(self.count))]
        self._children = {role: _Child(role, self._runtime, env) for role in roles}
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = []

        def on_signal() -> None:
            signals.append(time.monotonic())
            stop.set()
            if len(signals) > 1:  # a second signal: the API processes stop waiting for their calls
                for child in self._api_children():
                    child.signal(signal.SIGTERM)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        if config.metrics_port >= 0:  # before any process serves gRPC: whoever gets answers can read the metrics
            self._metrics_http, self.metrics_port = serve_metrics(config, metrics_dir)
        await self._children[ENGINE].start()
        await asyncio.gather(*(child.start() for child in self._api_children()))
        logger.info("serving on %s:%d (metrics on port %s) with %d API processes", config.host, self.port,
                    self.metrics_port, self.count,
                    extra={"event": "serving", "grpc_port": self.port, "metrics_port": self.metrics_port,
                           "repository": str(config.repository_path), "api_processes": self.count})
        watchers = [asyncio.create_task(self._keep(child, stop), name=f"keep {child.role}")
                    for child in self._children.values()]
        await stop.wait()
        self._draining = True
        logger.info("signal received; draining", extra={"event": "draining"})
        status = await self._drain()
        for watcher in watchers:
            watcher.cancel()
        logger.info("stopped", extra={"event": "stopped", "drained": status == 0})
        return 0

    def _api_children(self) -> list[_Child]:
        return [child for role, child in self._children.items() if role != ENGINE]

    async def _keep(self, child: _Child, stop: asyncio.Event) -> None:
        """Start `child` again whenever it dies, until the server drains."""
        backoff = RESTART_BACKOFF[0]
        while True:
            status = await child.wait()
            if self._draining or stop.is_set():
                return
            if child.pid is not None:
                _mark_dead(child.pid)
            logger.error("%s process (pid %s) died with status %s; starting it again", child.role, child.pid, status,
                         extra={"event": "process_died", "role": child.role, "status": status})
            if time.monotonic() - child.started_at > STEADY_SECONDS:
                backoff = RESTART_BACKOFF[0]
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, RESTART_BACKOFF[1])
            if self._draining or stop.is_set():
                return
            try:
                await child.start()
            except StartupError as error:  # it may start next time (a store that is back, ...)
                logger.error("%s", error)

    async def _drain(self) -> int:
        """The API processes drain and exit, then the engine process; 0 if every one exited cleanly."""
        limit = self.config.drain_grace_seconds + STOP_MARGIN_SECONDS
        apis = self._api_children()
        for child in apis:
            child.signal(signal.SIGTERM)
        statuses = await asyncio.gather(*(child.stop(limit) for child in apis))
        engine = self._children[ENGINE]
        engine.signal(signal.SIGTERM)
        statuses.append(await engine.stop(limit))
        return 0 if all(s == 0 for s in statuses) else 1


class _Child:
    """One process of the server: started with `-m server.supervisor --role ROLE`, ready when it prints
    "ready" on its standard output."""

    def __init__(self, role: str, runtime: Path, env: dict[str, str]):
        self.role, self.runtime, self.env = role, runtime, env
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def status(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    async def start(self) -> None:
        """Start it and wait until it is ready; StartupError saying why if it exits first."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.supervisor", "--role", self.role, "--runtime", str(self.runtime),
            "--parent", str(os.getpid()), stdout=asyncio.subprocess.PIPE, env=self.env)
        self.started_at = time.monotonic()
        line = (await self.process.stdout.readline()).decode(errors="replace").strip()
        if line == "ready":
            return
        status = await self.process.wait()
        why = line.removeprefix("error ") if line.startswith("error ") else f"it exited with status {status}"
        raise StartupError(f"the {self.role} process could not start: {why}")

    async def wait(self) -> int:
        return await self.process.wait()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def stop(self, limit: float) -> int:
        """Wait for it to exit (after the signal the caller sent), killing it after `limit` seconds."""
        if self.process is None:
            return 0
        try:
            return await asyncio.wait_for(self.process.wait(), limit)
        except asyncio.TimeoutError:
            logger.error("%s process (pid %s) did not exit %.0f s after SIGTERM; killing it", self.role, self.pid,
                         limit)
            self.kill()
            return await self.process.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)


def _check_files(config: ServerConfig) -> None:
    from server.api.auth import BearerTokens, TokenFileError
    from server.app import server_credentials

    server_credentials(config)
    try:
        BearerTokens(config.auth_token, config.auth_token_file)
    except TokenFileError as error:
        raise ConfigError(str(error)) from None


def hold_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Take `port` on `host` (0: a free one) and keep it: a socket bound with SO_REUSEPORT that never listens,
    so only this user's processes (the API processes, binding the same way) can join it.

    First the port is bound without SO_REUSEPORT, which fails if anyone at all holds it: a port in use is an
    error, never one silently shared with another server."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port} (in use?): {error.strerror}") from None
        address = probe.getsockname()
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(address)
    return holder, holder.getsockname()[1]


def serve_metrics(config: ServerConfig, metrics_dir: Path):
    """/metrics: every process's values from `metrics_dir`, added up. (server, bound port)."""
    from prometheus_client import CollectorRegistry, multiprocess

    from server.metrics import serve_metrics_http

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return serve_metrics_http(registry, config.metrics_port, config.host, **config.metrics_tls_files())


def _mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges from the shared metric files (its counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# --- the processes -------------------------------------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the supervisor dies (Linux), so no orphan keeps the port or the models."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the request above
        os._exit(1)


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.supervisor")
    parser.add_argument("--role", required=True, help="engine, or api-N")
    parser.add_argument("--runtime", required=True, help="the server's runtime directory")
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    # The supervisor's process group is the server: a kill of the group (a container's end) ends every process
    # at once; a terminal's Ctrl-C reaches the group too, and only the supervisor acts on it (it drains its
    # processes in order: the API processes first, then the engine process).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runtime = Path(args.runtime)
    config = ServerConfig(**json.loads((runtime / "config.json").read_text()))
    from server.app import GC_THRESHOLDS, setup_logging

    setup_logging(config.log_format, config.log_level, process=args.role)
    gc.set_threshold(*GC_THRESHOLDS)

    def ready() -> None:
        print("ready", flush=True)

    asyncio.run(_run_child(args.role, config, runtime, ready))
    return 1  # not reached: the child exits from inside its event loop


async def _run_child(role: str, config: ServerConfig, runtime: Path, ready) -> None:
    """Run the process of `role` until its drain is over, then exit at once, from inside the event loop: as
    `serve` does, so that the drained gRPC server answers UNAVAILABLE to the very end (leaving the loop
    first would cancel the calls that arrive meanwhile)."""
    try:
        if role == ENGINE:
            from server.engine_process import EngineProcess

            status = await EngineProcess(config, runtime).run(ready)
        else:
            from server import ipc
            from server.api.engine_link import EngineLink
            from server.app import App

            link = EngineLink(runtime / ipc.ENGINE_SOCKET, int(role.removeprefix("api-")))
            status = await App(config, engine_link=link).run(on_started=ready, signals=(signal.SIGTERM,))
    except ConfigError as error:
        print(f"error {error}", flush=True)  # the supervisor raises it
        status = 2
    except Exception as error:  # a start that failed: the supervisor raises it, and the log has the trace
        logger.error("%s process could not start: %s", role, error, exc_info=error)
        print(f"error {error}".replace("\n", " "), flush=True)
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(child_main())
