"""The engine process of a server with several API processes: the models (registry, engines, ONNX Runtime),
the sessions and their store, and the IPC end the API processes talk to (`server.ipc`).

It holds no gRPC server. Each API process is a peer on one ROUTER socket: its generations and
translations run as requests of the engines whose outputs go to the peer one step at a time
(`_Peer.deliver`: one OUT message per engine step); its session operations, pinned-version loads and
Triton sequence lookups are CALLs answered by REPLY; the model table goes to every peer after every
change. A peer that says HELLO again (a restarted API process) or falls silent has its requests
cancelled, as a disconnected client's are.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import numpy as np

from server import ipc
from server.config import ServerConfig, usable_cores
from server.engine.requests import Consumer, FinishEvent, StepOutput
from server.errors import SeqserveError, Unavailable
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.sessions import SessionManager
from server.sessions.generation import SessionGeneration
from server.sessions.sequences import SequenceMap
from server.sessions.store import StoreUnavailable

logger = logging.getLogger(__name__)


class _Peer(Consumer):
    """One API process, on its connection: the engines' consumer of its requests' outputs, sent to it
    as each step ends; what it asks comes in as messages."""

    def __init__(self, host: EngineProcess):
        super().__init__()
        self.host = host
        self.index: int | None = None  # from its HELLO
        self.pid: int | None = None
        self.connection = ipc.Connection(self._received, self._lost)
        self.requests: dict[int, tuple] = {}  # key -> (engine, slot) of a generation or translation
        self.generations: dict[int, SessionGeneration] = {}  # key -> a session generation it asked for
        self._posted: list[tuple[int, object]] = []  # session generations' events, sent once per loop pass

    def deliver(self, output: StepOutput) -> None:
        for key, item in output.events:
            if isinstance(item, (FinishEvent, BaseException)):
                self.requests.pop(key, None)
        self.connection.send(ipc.OUT, output)

    def post(self, key: int, item) -> None:
        """An event (or error) of one key outside any engine step; the pass's events leave together."""
        if not self._posted:
            asyncio.get_running_loop().call_soon(self._flush)
        self._posted.append((key, item))

    def _flush(self) -> None:
        events, self._posted = self._posted, []
        self.connection.send(ipc.OUT, StepOutput(_NO_IDS, _NO_IDS, events))

    def _received(self, kind: str, payload) -> None:
        self.host.handle(self, kind, payload)

    def _lost(self, error: Exception | None) -> None:
        self.host.lost(self)

    def end(self) -> None:
        """The API process is gone: its requests stop (session generations park what they made)."""
        for engine, slot in self.requests.values():
            engine.cancel(slot)
        for generation in self.generations.values():
            generation.cancel()
        self.requests.clear()
        self.generations.clear()


class EngineProcess:
    """Registry + sessions + the socket the API processes reach them through."""

    def __init__(self, config: ServerConfig, runtime: Path, *, metrics: Metrics | None = None):
        from server.app import make_registry, make_sessions  # the one place both kinds of process build them

        self.config = config
        self.metrics = metrics or Metrics()
        # A decode thread beside the worker pays where a core is free for it; on a host whose API processes
        # and ONNX Runtime already take every core, its hand-over each step only waits for the scheduler.
        spare = usable_cores() > config.resolved_api_processes() + 2
        self.registry: ModelRegistry = make_registry(config, self.metrics, decode_thread=spare)
        self.sessions: SessionManager = make_sessions(config, self.registry, self.metrics)
        self.sequences = SequenceMap()
        self.socket_path = runtime / ipc.ENGINE_SOCKET
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._tasks: set[asyncio.Task] = set()
        self._watchers: list[asyncio.Task] = []
        self._handlers = {ipc.CALL: self._call, ipc.SUBMIT: self._submit, ipc.SESSION_GENERATE: self._session_generate,
                          ipc.CANCEL: self._cancel, ipc.TAKEN: self._taken}
        self._table: ipc.ModelTable | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.registry.start()
        try:
            await self.sessions.start()
        except StoreUnavailable:
            await self.registry.stop(0)
            raise
        self._table = self._model_table()
        self.socket_path.unlink(missing_ok=True)  # an earlier engine process's
        self._server = await asyncio.get_running_loop().create_unix_server(self._connected, str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._watchers = [asyncio.create_task(self._watch_table(), name="engine table watch")]
        if self.config.poll_interval_seconds > 0:
            self._watchers.append(asyncio.create_task(
                self.registry.poll(self.config.poll_interval_seconds, after=self._publish), name="repository poll"))
        logger.info("engine process ready on %s", self.socket_path, extra={"event": "engine_ready"})

    async def stop(self, grace: float) -> None:
        for task in self._watchers:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            peer.end()
        await self.sessions.stop()
        await self.registry.stop(grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in list(self._peers):
            peer.connection.close()

    async def run(self, ready=None) -> int:
        """Serve the API processes until SIGTERM; `ready()` is called once they can connect."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await self.start()
        if ready is not None:
            ready()
        await stop.wait()
        await self.stop(self.config.drain_grace_seconds)
        return 0

    # --- the connections ------------------------------------------------------------------------

    def _connected(self) -> ipc.Connection:
        peer = _Peer(self)
        self._peers.add(peer)
        return peer.connection

    def handle(self, peer: _Peer, kind: str, payload) -> None:
        """A message from an API process (on the event loop, as it arrives)."""
        if kind == ipc.HELLO:
            self._hello(peer, payload)
        elif peer.index is None:
            logger.warning("a %s message from an API process that said no HELLO; ignored", kind)
        else:
            self._handlers[kind](peer, payload)

    def lost(self, peer: _Peer) -> None:
        """An API process closed its connection (it ended or died): what it asked for stops."""
        self._peers.discard(peer)
        peer.end()

    def _hello(self, peer: _Peer, payload) -> None:
        index, pid = payload
        for old in [p for p in self._peers if p.index == index and p is not peer]:
            logger.info("API process %d restarted (pid %s -> %d); ending what the old one left running",
                        index, old.pid, pid)
            self._peers.discard(old)
            old.end()
            old.connection.close()
        peer.index, peer.pid = index, pid
        peer.connection.send(ipc.MODELS, self._table)

    def _spawn(self, coroutine, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- requests ---------------------------------------------------------------------------------

    def _submit(self, peer: _Peer, payload) -> None:
        key, model, version, request = payload
        self._spawn(self._run_submit(peer, key, model, version, request), f"submit {request.request_id}")

    async def _run_submit(self, peer: _Peer, key: int, model: str, version: int, request) -> None:
        try:
            engine = await self.registry.get(model, version)
            slot = engine.submit_for(request, peer, key)
        except Exception as error:  # noqa: BLE001 - the request's error, answered on its stream
            peer.post(key, _answerable(error))
            return
        peer.requests[key] = (engine, slot)

    def _cancel(self, peer: _Peer, key: int) -> None:
        running = peer.requests.pop(key, None)
        if running is not None:
            engine, slot = running
            engine.cancel(slot)
        generation = peer.generations.get(key)
        if generation is not None:
            generation.cancel()

    def _session_generate(self, peer: _Peer, payload) -> None:
        key, session_id, params, leave_unchanged, request_id, retry_id, priority = payload
        self._spawn(self._run_session_generation(peer, key, session_id, params, leave_unchanged, request_id,
                                                 retry_id, priority), f"session generation {request_id}")

    async def _run_session_generation(self, peer: _Peer, key: int, session_id: str, params, leave_unchanged: bool,
                                      request_id: str, retry_id: str, priority: int) -> None:
        """A session generation for an API process: its events go there; the session's next operation waits
        until that process's caller took the finish (TAKEN), as it waits for a caller in this process."""
        generation, finished = None, False
        try:
            await self.sessions.ensure(session_id)
            generation = self.sessions.generate(session_id, params, leave_unchanged=leave_unchanged,
                                                request_id=request_id, retry_id=retry_id, priority=priority,
                                                end_taken_by_owner=True)
            peer.generations[key] = generation
            engine = await generation.ready()
            peer.post(key, ipc.GenerationReady(engine.name, engine.version))
            while events := await generation.next_batch():
                for event in events:
                    if isinstance(event, FinishEvent):
                        peer.post(key, ipc.GenerationConsumed(generation.tokens_consumed or 0))
                        finished = True
                    peer.post(key, event)
        except asyncio.CancelledError:
            peer.post(key, Unavailable("the engine process is stopping; retry"))
            raise
        except Exception as error:  # noqa: BLE001 - answered on the stream
            peer.post(key, _answerable(error))
        finally:
            if not finished:  # nothing for the caller to take: the session goes on at once
                if peer.generations.get(key) is generation:
                    peer.generations.pop(key, None)
                if generation is not None:
                    generation.end_taken()

    def _taken(self, peer: _Peer, key: int) -> None:
        generation = peer.generations.pop(key, None)
        if generation is not None:
            generation.end_taken()

    # --- calls --------------------------------------------------------------------------------------

    def _call(self, peer: _Peer, payload) -> None:
        call_id, method, args, kwargs = payload
        self._spawn(self._run_call(peer, call_id, method, args, kwargs), f"call {method}")

    async def _run_call(self, peer: _Peer, call_id: int, method: str, args: tuple, kwargs: dict) -> None:
        try:
            value = await self._method(method)(*args, **kwargs)
            reply = (call_id, True, value)
        except Exception as error:  # noqa: BLE001 - raised again in the API process
            reply = (call_id, False, _answerable(error))
        peer.connection.send(ipc.REPLY, reply)

    def _method(self, name: str):
        methods = {
            "load": self._load, "describe": self._describe,
            "create": self.sessions.create, "feed": self.sessions.feed, "fork": self.sessions.fork,
            "get": self.sessions.get, "close": self.sessions.close, "export": self.sessions.export,
            "import_": self.sessions.import_,
            "sequence_get": self.sequences.get, "sequence_put": self.sequences.put,
            "sequence_pop": self.sequences.pop,
        }
        try:
            return methods[name]
        except KeyError:
            raise SeqserveError(f"the engine process has no method {name!r}") from None

    async def _load(self, name: str, version: int) -> ipc.ModelTable:
        """Load a version a request pinned (NotFound / Unavailable as the registry says); the new table."""
        await self.registry.get(name, version)
        self._publish()
        return self._table

    async def _describe(self) -> ipc.ModelTable:
        return self._table

    # --- the model table ----------------------------------------------------------------------------

    def _model_table(self) -> ipc.ModelTable:
        entries = []
        engines = {(e.name, e.version): e for e in self.registry.engines()}
        for status in self.registry.models():
            loaded = {}
            for version in status.loaded_versions:
                engine = engines.get((status.name, version))
                if engine is None:
                    continue
                bundle = engine.bundle
                loaded[version] = ipc.LoadedVersion(bundle.manifest.SerializeToString(), bundle.variant,
                                                    str(bundle.path), tuple(bundle.providers),
                                                    tuple(bundle.requested_providers), engine.accepting)
            entries.append(ipc.ModelEntry(status.name, status.versions, status.serving_version, loaded))
        return ipc.ModelTable(self.registry.started, tuple(entries), self.config.max_input_tokens,
                              self.sessions.limits.default_ttl_seconds)

    def _publish(self) -> None:
        table = self._model_table()
        if table == self._table:
            return
        self._table = table
        for peer in self._peers:
            if peer.index is not None:
                peer.connection.send(ipc.MODELS, table)

    async def _watch_table(self) -> None:
        """Publish the table when it changed outside a call (a retiring version stopped, say)."""
        while True:
            await asyncio.sleep(1.0)
            self._publish()


_NO_IDS = np.zeros(0, dtype=np.int64)


def _answerable(error: BaseException) -> BaseException:
    """An error as it crosses to an API process: our domain errors as they are, anything else INTERNAL."""
    if isinstance(error, SeqserveError):
        return error
    if isinstance(error, asyncio.CancelledError):
        return Unavailable("the engine process is stopping; retry")
    logger.error("an engine-process operation failed", exc_info=error)
    return SeqserveError(f"internal error: {type(error).__name__}: {error}")
