"""Process wiring: config -> model registry + session manager -> grpc.aio server (Seqserve, the Open Inference
Protocol, health, reflection) + /metrics.

Lifecycle: `start()` loads the repository and binds the ports (port 0 picks a free one; the bound ports
are on the App and in the "serving" log line); a repository poll publishes new versions; `drain()` (on
SIGTERM or SIGINT) turns health to NOT_SERVING, refuses new calls with UNAVAILABLE, lets in-flight
calls finish within the grace period, then stops the engines and the server.

A `seqserve serve` process ends without gRPC's own shutdown: that cancels (CANCELLED, which clients do
not retry) every call that arrives while it runs. Instead the server goes on refusing new calls with
UNAVAILABLE until the process exits, and the exit closes the sockets, which clients also see as
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seqserve.v1 import service_pb2
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.api.auth import BearerTokens, TokenFileError
from server.api.engine_link import EngineLink, RemoteRegistry, RemoteSequences, RemoteSessions
from server.api.errors import SERVICE, StatusInterceptor, request_id_var
from server.api.inference import InferenceServicer, add_to_server
from server.api.servicer import SeqserveServicer
from server.config import ConfigError, ServerConfig
from server.engine import EngineConfig
from server.errors import StartupError, Unavailable
from server.metrics import Metrics, serve_metrics_http
from server.registry import ModelRegistry
from server.sessions import SessionLimits, SessionManager
from server.sessions.sequences import SequenceMap
from server.sessions.store import StoreUnavailable
from server.sessions.stores import open_store

logger = logging.getLogger("server.app")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FLUSH_SECONDS = 0.1  # after a drain, for the last frames of the calls it waited for (see App.run)


class DrainGate:
    """Counts in-flight Seqserve calls and refuses new ones once draining (StatusInterceptor calls it)."""

    def __init__(self):
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down and takes no new requests; retry on another replica")
        self.active += 1
        self._idle.clear()

    def exit(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float, give_up: asyncio.Event | None = None) -> bool:
        """Whether every in-flight call finished within `timeout` seconds (or before `give_up` was set)."""
        if self.active == 0:
            return True
        waiters = [asyncio.ensure_future(self._idle.wait())]
        if give_up is not None:
            waiters.append(asyncio.ensure_future(give_up.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self.active == 0


class App:
    """One seqserve server process. `await start()`, then `await drain()` (or `run()` until a signal)."""

    def __init__(self, config: ServerConfig, *, registry=None, metrics=None, engine_link: EngineLink | None = None):
        self.config = config
        self.metrics = metrics
        self.registry = registry
        self.sessions: SessionManager | RemoteSessions | None = None
        self.sequences: SequenceMap | RemoteSequences | None = None
        # An API process of a server with several (`server.supervisor`): the models and sessions are the engine
        # process's, reached through this link; the port is shared with the other API processes; /metrics is
        # the supervisor's. Without it, one process holds everything.
        self.engine_link = engine_link
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.gate = DrainGate()
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._poller: asyncio.Task | None = None
        self._known_models: frozenset[str] = frozenset()
        self._token_histograms: dict[str, tuple] = {}  # model -> (time to first token, inter-token) children
        self._stopped = asyncio.Event()
        self._give_up = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        credentials = server_credentials(config)  # before anything loads: a bad file is a start-up error
        try:
            tokens = BearerTokens(config.auth_token, config.auth_token_file)
        except TokenFileError as error:
            raise ConfigError(str(error)) from None
        if self.metrics is None:
            self.metrics = Metrics()
        link = self.engine_link
        if link is not None:
            self.registry = RemoteRegistry(link, config.repository_path, config.providers, config.variant)
            self.sessions = RemoteSessions(link, self.registry)
            self.sequences = RemoteSequences(link)
            link.on_change.append(lambda: asyncio.ensure_future(self._update_health()))
            try:
                await self.registry.start()
            except Unavailable as error:
                raise StartupError(str(error)) from None
        else:
            if self.registry is None:
                self.registry = make_registry(config, self.metrics)
            await self.registry.start()
            self.sessions = make_sessions(config, self.registry, self.metrics)
            self.sequences = SequenceMap()
            try:
                await self.sessions.start()  # opens the store: an unreachable Redis or unwritable file fails here
            except StoreUnavailable as error:
                await self.registry.stop(0)
                raise StartupError(str(error)) from None

        server = grpc.aio.server(
            interceptors=[StatusInterceptor(observe=self._observe_call, gate=self.gate, auth=tokens)],
            # One process: a busy port is an error, never a silently shared one. API processes share theirs
            # (the supervisor checked that nobody else holds it).
            options=[("grpc.max_receive_message_length", config.max_receive_message_bytes),
                     ("grpc.so_reuseport", int(link is not None))])
        pb_grpc.add_SeqserveServicer_to_server(
            SeqserveServicer(self.registry, config.request_limits(), observe_tokens=self._observe_tokens,
                             sessions=self.sessions, stream_interval=config.stream_interval_ms / 1000), server)
        add_to_server(InferenceServicer(self.registry, config.request_limits(), sessions=self.sessions,
                                        sequences=self.sequences, observe_tokens=self._observe_tokens,
                                        stream_interval=config.stream_interval_ms / 1000), server)  # KServe v2
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (service_pb2.DESCRIPTOR.services_by_name["Seqserve"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        self.port = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port} (in use?)")
        await server.start()
        self._server = server
        if config.metrics_port >= 0 and link is None:
            self._metrics_http, self.metrics_port = serve_metrics_http(
                self.metrics.registry, config.metrics_port, config.host, **config.metrics_tls_files())
        await self._update_health()
        if config.poll_interval_seconds > 0 and link is None:  # else the engine process polls
            self._poller = asyncio.create_task(self.registry.poll(config.poll_interval_seconds,
                                                                  after=self._update_health))
        if link is not None:
            logger.info("API process %d serving on %s:%d", link.index, config.host, self.port,
                        extra={"event": "api_serving", "grpc_port": self.port, "api_process": link.index})
            return
        logger.info("serving on %s:%d (metrics on port %s)", config.host, self.port, self.metrics_port,
                    extra={"event": "serving", "grpc_port": self.port, "metrics_port": self.metrics_port,
                           "repository": str(config.repository_path)})

    async def run(self, on_started=None, signals=(signal.SIGTERM, signal.SIGINT)) -> int:
        """Serve until one of `signals`, then drain (a second signal cuts the drain short); exit status 0.
        `on_started()` is called once the server serves.

        The gRPC server is left listening (refusing every call with UNAVAILABLE): the caller exits the
        process next (see the module docstring)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():  # a second signal: stop waiting for in-flight calls
                logger.warning("second signal: cancelling in-flight calls now")
                self._give_up.set()
            stop.set()

        for signum in signals:
            loop.add_signal_handler(signum, on_signal)
        await self.start()
        if on_started is not None:
            on_started()
        await stop.wait()
        logger.info("signal received; draining", extra={"event": "draining"})
        await self.drain(stop_server=False)
        # gRPC reports a status sent once it is framed, a moment before its bytes reach the socket: let them
        # leave before the caller exits the process (arrivals meanwhile are still refused with UNAVAILABLE).
        await asyncio.sleep(FLUSH_SECONDS)
        return 0

    async def drain(self, grace: float | None = None, *, stop_server: bool = True) -> None:
        """Stop serving gracefully: health NOT_SERVING, new calls refused, in-flight ones finish (or are
        cancelled after `grace` seconds, default the config's), then the engines and (with `stop_server`)
        the gRPC server stop. Without it the server keeps answering UNAVAILABLE until the process exits."""
        if self._stopped.is_set():
            if stop_server and self._server is not None:
                await self._server.stop(0)
                self._server = None
            return
        self._stopped.set()
        grace = self.config.drain_grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.gate.draining = True
        if self._poller is not None:
            self._poller.cancel()
        finished = await self.gate.wait_idle(grace, self._give_up)
        if not finished:
            logger.warning("%d calls still running after the %.1fs grace period (or a second signal); "
                           "the engines stopping end them (UNAVAILABLE)", self.gate.active, grace)
        if self.sessions is not None:
            await self.sessions.stop()
        if self.registry is not None:  # None when start() failed before it made one
            await self.registry.stop(max(0.0, deadline - time.monotonic()))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if stop_server and self._server is not None:
            # Health watchers and the like are the only calls left: a short grace ends them cleanly.
            await self._server.stop(max(0.0, min(1.0, deadline - time.monotonic())))
            self._server = None
        logger.info("stopped", extra={"event": "stopped", "drained": finished})

    # --- internals -------------------------------------------------------------------------------------

    async def _update_health(self) -> None:
        """Overall health, and per model `seqserve.v1.Seqserve/MODEL`: SERVING when its latest version is
        (an API process whose engine process is down serves nothing: NOT_SERVING everywhere)."""
        if self._stopped.is_set():
            return
        if self.engine_link is not None and not self.engine_link.up:
            for name in self._known_models:
                await self.health.set(f"{SERVICE}/{name}", NOT_SERVING)
            await self.health.set(SERVICE, NOT_SERVING)
            await self.health.set(health.OVERALL_HEALTH, NOT_SERVING)
            return
        statuses = self.registry.models()
        known = frozenset(status.name for status in statuses)
        for status in statuses:
            await self.health.set(f"{SERVICE}/{status.name}",
                                  SERVING if status.serving_version is not None else NOT_SERVING)
        for gone in self._known_models - known:  # removed from the repository
            await self.health.set(f"{SERVICE}/{gone}", NOT_SERVING)
        self._known_models = known
        await self.health.set(SERVICE, SERVING)
        await self.health.set(health.OVERALL_HEALTH, SERVING)

    def _observe_call(self, rpc: str, model: str, code: str, seconds: float) -> None:
        # Only names the repository has become label values: a client making up names must not be able
        # to grow the metric without bound.
        model = model if model in self._known_models else ""
        self.metrics.requests_total.labels(model=model, rpc=rpc, code=code).inc()
        self.metrics.request_duration_seconds.labels(model=model, rpc=rpc).observe(seconds)

    def _observe_tokens(self, model: str, since_previous: float | None, since_start: float) -> None:
        # Called for every chunk of every stream: the model's histogram children are looked up once.
        children = self._token_histograms.get(model)
        if children is None:
            metrics = self.metrics
            children = self._token_histograms[model] = (metrics.time_to_first_token_seconds.labels(model=model),
                                                         metrics.inter_token_latency_seconds.labels(model=model))
        if since_previous is None:
            children[0].observe(since_start)
        else:
            children[1].observe(since_previous)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files (None without TLS); ConfigError naming an unreadable one."""
    if not config.tls_cert_file:
        return None
    key, chain = _read_pem(config, "tls_key_file"), _read_pem(config, "tls_cert_file")
    client_ca = _read_pem(config, "tls_client_ca_file") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _read_pem(config: ServerConfig, setting: str) -> bytes:
    path = getattr(config, setting)
    try:
        data = open(path, "rb").read()
    except OSError as error:
        raise ConfigError(f"{setting} {path} cannot be read: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{setting} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def _session_limits(config: ServerConfig) -> SessionLimits:
    # A session looks back as far as a Generate request can (its prompt and its output), so a session's text
    # decodes as a Generate of the same text would, and costs the batch no more history than one.
    return SessionLimits(max_sessions=config.max_sessions, default_ttl_seconds=config.session_ttl_seconds,
                         max_ttl_seconds=config.max_session_ttl_seconds,
                         history_tokens=config.max_input_tokens + 1 + config.max_new_tokens)


def make_registry(config: ServerConfig, metrics: Metrics, *, decode_thread: bool = True) -> ModelRegistry:
    """The model registry a server's config describes (not started); `decode_thread`: see EngineConfig."""
    engine_config = EngineConfig(max_rows=config.max_rows_per_step, max_queued=config.max_queue,
                                 decode_thread=decode_thread,
                                 limits=config.request_limits(),
                                 prefix_cache_bytes=config.prefix_cache_bytes,
                                 prefix_cache_stride=config.prefix_cache_stride,
                                 priority_aging_seconds=config.priority_aging_seconds)
    return ModelRegistry(config.repository_path, config=engine_config, metrics=metrics, providers=config.providers,
                         session_options=config.session_options, variant=config.variant,
                         drain_seconds=config.drain_grace_seconds)


def make_sessions(config: ServerConfig, registry, metrics: Metrics) -> SessionManager:
    """The session manager of `registry`'s models with the config's limits and store (not started)."""
    limits = _session_limits(config)
    return SessionManager(registry, limits, metrics=metrics,
                          store=open_store(config.session_store, tombstones=limits.tombstones),
                          signing_key=config.session_signing_key.encode() or None)


# --- logs ---------------------------------------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            entry["request_id"] = request_id
        entry.update({key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _RequestIdFilter(logging.Filter):
    def __init__(self, process: str | None):
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if self.process is not None:
            record.process_role = self.process
        return True


def setup_logging(log_format: str = "json", level: str = "info", stream=None, process: str | None = None) -> None:
    """Route every logger to one stderr handler in `log_format`; request ids come from the call's context.
    `process` (a server of several processes: "engine", "api-0", ...) is named in every line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_RequestIdFilter(process))
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class ServerThread:
    """An App on its own event loop in a background thread, for programs (and tests) that are not async.

        with ServerThread(config) as server:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    """

    def __init__(self, config: ServerConfig, **app_kwargs):
        self._config, self._app_kwargs = config, app_kwargs
        self.loop = asyncio.new_event_loop()
        self.app: App | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="seqserve-server", daemon=True)

    @property
    def port(self) -> int:
        return self.app.port

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        self.app = self.call(self._make_app(), timeout)
        self.call(self.app.start(), timeout)
        return self

    def call(self, coroutine, timeout: float | None = 60.0):
        """Run `coroutine` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        if self.app is not None:
            self.call(self.app.drain(grace), timeout=grace + 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    async def _make_app(self) -> App:
        return App(self._config, **self._app_kwargs)  # built on the loop: its asyncio objects belong there


# The event loop's thread handles every streamed token; at the default young-generation threshold (700 net
# container allocations) a busy server runs a collection every few engine steps, several us of loop CPU per
# token at 128 streams. A higher threshold collects the same garbage in far fewer passes.
GC_THRESHOLDS = (10_000, 10, 10)


async def serve(config: ServerConfig) -> int:
    """Run one server until a signal, drain it, and end the process (its exit status if it failed): one
    process, or with `api_processes` above 1 a supervisor of an engine process and the API processes."""
    if config.resolved_api_processes() > 1:
        from server.supervisor import Supervisor

        status = await Supervisor(config).run()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    gc.set_threshold(*GC_THRESHOLDS)  # the process's own server only: embedding programs keep theirs
    app = App(config)
    try:
        status = await app.run()
    except BaseException:
        with contextlib.suppress(Exception):
            await app.drain(0)
        raise
    # Drained: exit while the server still answers UNAVAILABLE (the module docstring says why).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
