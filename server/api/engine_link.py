"""An API process's link to the engine process (`server.ipc`), and the registry, models, sessions and
Triton sequences the servicers use through it: the same interfaces as the in-process `ModelRegistry`,
`ModelEngine` and `SessionManager` offer, so one servicer serves both ways.

Generations and translations are streams in this process (`RequestStream`, in the link's `StreamTable`):
the engine sends each step's outputs for all of them in one message, plain tokens as arrays, and the
text is made here when a stream's writer takes them. Everything else is a call answered by a reply.

While the engine process is gone (killed, restarting: its end of the connection closes) every call and
stream fails at once with UNAVAILABLE, and new ones are refused the same way; when it is back the link
connects, says HELLO again and serves as before. Nothing is queued for an engine that is not connected,
so an operation refused here is never applied there later.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from seqserve.bundle.spec import ModelSpec
from seqserve.v1.manifest_pb2 import Manifest
from server import ipc
from server.bundle.tokenizers import DescribedBundle, open_tokenizers
from server.decoding import DecodingParams
from server.engine.requests import RequestStream, StreamTable, context_of
from server.errors import Unavailable
from server.registry import ModelStatus
from server.text.table import TokenTable

logger = logging.getLogger(__name__)


class EngineLink:
    """The connection to the engine process (its Unix socket at `path`), the calls in flight on it, and this
    process's streams. It connects again, and says HELLO again, whenever the engine process comes back."""

    def __init__(self, path: str | os.PathLike[str], index: int):
        self.path, self.index = str(path), index
        self.streams = StreamTable()
        self.table: ipc.ModelTable | None = None
        self.up = False
        self.on_change: list[Callable[[], None]] = []  # called when the table changes or the engine comes or goes
        self._keys = itertools.count(1)
        self._calls: dict[int, asyncio.Future] = {}
        self._connection: ipc.Connection | None = None
        self._connector: asyncio.Task | None = None
        self._first_table: asyncio.Future | None = None
        self._stopping = False

    async def start(self, timeout: float = 120.0) -> None:
        """Connect and wait for the model table (the engine process is up)."""
        self._first_table = asyncio.get_running_loop().create_future()
        self._connector = asyncio.create_task(self._connect(), name="engine link connect")
        try:
            await asyncio.wait_for(asyncio.shield(self._first_table), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"the engine process at {self.path} did not answer in {timeout:.0f} s") from None

    async def stop(self) -> None:
        self._stopping = True
        if self._connector is not None:
            self._connector.cancel()
        self._down("the server is shutting down")
        if self._connection is not None:
            self._connection.close()

    def new_key(self) -> int:
        return next(self._keys)

    def send(self, kind: str, payload) -> None:
        """Send now, or raise UNAVAILABLE when the engine process is not connected (nothing waits for it)."""
        if not self.up or self._connection is None or not self._connection.send(kind, payload):
            raise _engine_gone()

    def send_quietly(self, kind: str, payload) -> None:
        """Send if connected (a cancel or a receipt the engine cannot miss: a lost engine forgot the request)."""
        try:
            self.send(kind, payload)
        except Unavailable:
            pass

    async def call(self, method: str, *args, **kwargs):
        """A method of the engine process; raises what it raised there."""
        call_id = self.new_key()
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        try:
            self.send(ipc.CALL, (call_id, method, args, kwargs))
            return await future
        finally:
            self._calls.pop(call_id, None)

    # --- the connection ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect (trying again while the engine process is not there), then say who this is: the engine
        process answers with its table, and the link is up."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                _, connection = await loop.create_unix_connection(
                    lambda: ipc.Connection(self._received, self._lost), self.path)
            except OSError:  # not there yet, or restarting
                await asyncio.sleep(_RECONNECT_SECONDS)
                continue
            self._connection = connection
            connection.send(ipc.HELLO, (self.index, os.getpid()))
            return

    def _received(self, kind: str, payload) -> None:
        if kind == ipc.OUT:
            self.streams.deliver(payload)
        elif kind == ipc.REPLY:
            call_id, ok, value = payload
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        elif kind == ipc.MODELS:
            self.table, self.up = payload, True
            if not self._first_table.done():
                self._first_table.set_result(None)
            self._changed()

    def _lost(self, error: Exception | None) -> None:
        self._connection = None
        if self._stopping:
            return
        logger.warning("the engine process disconnected; calls fail with UNAVAILABLE until it is back")
        self._down("the engine process is not running (it is restarting); retry")
        self._connector = asyncio.ensure_future(self._connect())

    def _down(self, why: str) -> None:
        was_up, self.up = self.up, False
        error = Unavailable(why)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self.streams.fail_all(error)
        if was_up:
            self._changed()

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()


_RECONNECT_SECONDS = 0.05  # between tries to reach an engine process that is not (yet) listening


def _engine_gone() -> Unavailable:
    return Unavailable("the engine process is not running (it is restarting); retry")


# --- models ----------------------------------------------------------------------------------------------

@dataclass
class BundleView(DescribedBundle):
    """What the API reads of a loaded bundle (`LoadedBundle` has the same names): its manifest, spec,
    variant, providers and tokenizers, the latter read from the bundle directory here."""

    path: Path
    manifest: Manifest
    spec: ModelSpec
    variant: str
    providers: tuple[str, ...]
    requested_providers: tuple[str, ...]
    tokenizers: dict[str, Tokenizer]


class RemoteModel:
    """A model version the engine process serves, as `ModelEngine` looks to the API."""

    def __init__(self, link: EngineLink, loaded: ipc.LoadedVersion):
        manifest = Manifest.FromString(loaded.manifest)
        spec = ModelSpec.from_manifest(manifest, loaded.variant)
        self.bundle = BundleView(Path(loaded.path), manifest, spec, loaded.variant, loaded.providers,
                                 loaded.requested_providers, open_tokenizers(Path(loaded.path), manifest))
        self.loaded = loaded
        self.name, self.version, self.spec, self.kind = spec.name, spec.version, spec, spec.kind
        self.table = TokenTable.build(self.bundle.tokenizer(spec.output_tokenizer_role), spec.vocab_size)
        self._link = link

    @property
    def accepting(self) -> bool:
        return self._link.up and self.loaded.accepting

    @property
    def max_input_tokens(self) -> int:
        return self._link.table.max_input_tokens

    def tokenizer(self, role: str) -> Tokenizer:
        return self.bundle.tokenizer(role)

    def submit(self, request) -> RequestStream:
        """A generation or translation in the engine process; its events arrive on the returned stream (an
        error the engine raised, too, as the stream's first item)."""
        link = self._link
        key = link.new_key()
        stream = RequestStream(request.request_id, request.params, on_cancel=lambda: link.send_quietly(ipc.CANCEL, key),
                               table=self.table, context_ids=context_of(request))
        link.streams.add(key, stream)
        try:
            link.send(ipc.SUBMIT, (key, self.name, self.version, request))
        except BaseException:
            link.streams.discard(key)
            raise
        return stream


class RemoteRegistry:
    """The engine process's registry as `ModelRegistry` looks to the API: its table, pinned versions loaded
    on demand there. The engine process polls the repository; its table reaches every API process."""

    def __init__(self, link: EngineLink, repository: Path, providers, variant: str):
        self.link, self.repository, self.providers, self.variant = link, repository, tuple(providers), variant
        self._models: dict[tuple[str, int], RemoteModel] = {}

    @property
    def started(self) -> bool:
        return self.link.up and self.link.table is not None and self.link.table.started

    async def start(self) -> None:
        await self.link.start()

    async def stop(self, grace_seconds: float | None = None) -> None:
        await self.link.stop()

    async def refresh(self) -> list:
        return []  # the engine process polls the repository

    def engines(self) -> list:
        return []

    def models(self) -> list[ModelStatus]:
        table = self.link.table
        if table is None or not self.link.up:  # not "no models" (OK / NOT_FOUND, which clients do not retry)
            raise _engine_gone()
        statuses = []
        for entry in table.models:
            spec = None
            if entry.serving_version is not None and entry.serving_version in entry.loaded:
                spec = self._model(entry.name, entry.serving_version, entry.loaded[entry.serving_version]).spec
            statuses.append(ModelStatus(entry.name, entry.versions, entry.serving_version,
                                        tuple(sorted(entry.loaded)), spec))
        return statuses

    async def get(self, name: str, version: int = 0) -> RemoteModel:
        """The model version (0: the latest) as `ModelRegistry.get` gives it: NotFound, Unavailable alike."""
        link = self.link
        if not link.up:
            raise _engine_gone()
        found = self._lookup(name, version)
        if found is None:  # not loaded: the engine process loads it, or says why not
            link.table = await link.call("load", name, version)
            found = self._lookup(name, version)
            if found is None:
                raise Unavailable(f"model {name} version {version} is not loaded; retry")
        return found

    def _lookup(self, name: str, version: int) -> RemoteModel | None:
        entry = next((e for e in self.link.table.models if e.name == name), None)
        if entry is None:
            return None
        version = version or entry.serving_version
        loaded = entry.loaded.get(version) if version else None
        return self._model(name, version, loaded) if loaded is not None else None

    def _model(self, name: str, version: int, loaded: ipc.LoadedVersion) -> RemoteModel:
        model = self._models.get((name, version))
        if model is None or model.loaded.manifest != loaded.manifest:
            model = self._models[name, version] = RemoteModel(self.link, loaded)
        else:
            model.loaded = loaded  # accepting may have changed
        return model


# --- sessions and sequences -------------------------------------------------------------------------------

class RemoteGeneration(RequestStream):
    """A session generation running in the engine process, as `SessionGeneration` looks to the API."""

    def __init__(self, link: EngineLink, registry: RemoteRegistry, request_id: str, params: DecodingParams):
        self.key = link.new_key()
        super().__init__(request_id, params, on_cancel=lambda: link.send_quietly(ipc.CANCEL, self.key),
                         on_end_taken=lambda: link.send_quietly(ipc.TAKEN, self.key))
        self.tokens_consumed: int | None = None
        self._registry = registry
        self._ready = asyncio.get_running_loop().create_future()
        self._ready.add_done_callback(_retrieve)

    async def ready(self) -> RemoteModel:
        model, version = await asyncio.shield(self._ready)
        return await self._registry.get(model, version)

    def put(self, event) -> None:
        if isinstance(event, ipc.GenerationReady):
            if not self._ready.done():
                self._ready.set_result((event.model, event.version))
        elif isinstance(event, ipc.GenerationConsumed):
            self.tokens_consumed = event.tokens_consumed
        else:
            super().put(event)

    def fail(self, error: BaseException) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
        super().fail(error)


@dataclass(frozen=True)
class _Limits:
    default_ttl_seconds: int


class RemoteSessions:
    """The engine process's `SessionManager`, as the servicers use it."""

    def __init__(self, link: EngineLink, registry: RemoteRegistry):
        self.link, self.registry = link, registry

    @property
    def limits(self) -> _Limits:
        return _Limits(self.link.table.default_ttl_seconds)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ensure(self, session_id: str) -> None:
        return None  # the engine process adopts a shared store's session when the operation arrives

    async def create(self, model: str, version: int = 0, prefix: str = "", ttl_seconds: int = 0):
        return await self.link.call("create", model, version, prefix, ttl_seconds)

    async def feed(self, session_id: str, text: str, want_log_probs: bool = False, request_id: str = ""):
        return await self.link.call("feed", session_id, text, want_log_probs, request_id)

    async def fork(self, session_id: str, ttl_seconds: int = 0):
        return await self.link.call("fork", session_id, ttl_seconds)

    async def get(self, session_id: str, *, generation_included: bool = False):
        return await self.link.call("get", session_id, generation_included=generation_included)

    async def close(self, session_id: str):
        return await self.link.call("close", session_id)

    async def export(self, session_id: str) -> bytes:
        return await self.link.call("export", session_id)

    async def import_(self, data: bytes, ttl_seconds: int = 0):
        return await self.link.call("import_", data, ttl_seconds)

    def generate(self, session_id: str, params: DecodingParams, *, leave_unchanged: bool = False,
                 request_id: str = "", retry_id: str = "", priority: int = 0) -> RemoteGeneration:
        generation = RemoteGeneration(self.link, self.registry, request_id, params)
        self.link.streams.add(generation.key, generation)
        try:
            self.link.send(ipc.SESSION_GENERATE, (generation.key, session_id, params, leave_unchanged, request_id,
                                                  retry_id, priority))
        except BaseException as error:
            self.link.streams.discard(generation.key)
            generation.fail(error)
        return generation


class RemoteSequences:
    """The engine process's Triton sequence map (`server.sessions.sequences.SequenceMap`)."""

    def __init__(self, link: EngineLink):
        self.link = link

    async def get(self, key):
        return await self.link.call("sequence_get", key)

    async def put(self, key, session_id: str) -> None:
        await self.link.call("sequence_put", key, session_id)

    async def pop(self, key, session_id: str | None = None):
        return await self.link.call("sequence_pop", key, session_id)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()

