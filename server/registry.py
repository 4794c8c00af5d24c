"""ModelRegistry: the repository's models, one ModelEngine per loaded version, hot swap and draining.

The latest version of every model is loaded at start; a version a request pins is loaded when first
asked for. `refresh` (or `poll`, which calls it every interval) rescans the repository: a newly
published latest version is loaded and started, new requests go to it, and the version it replaces
stops once its in-flight requests are done. Loading runs in a thread, so serving never pauses.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqserve.bundle import scan_repository
from seqserve.bundle.spec import ModelSpec
from server.bundle import CPU_PROVIDER, DEFAULT_VARIANT, load_bundle
from server.bundle.sessions import ProviderSpec
from server.engine import EngineConfig, ModelEngine
from server.errors import NotFound, Unavailable
from server.metrics import Metrics

logger = logging.getLogger(__name__)

Key = tuple[str, int]


@dataclass(frozen=True)
class ModelStatus:
    """One model as ListModels shows it."""

    name: str
    versions: tuple[int, ...]  # on disk, ascending
    serving_version: int | None  # what a request without a version gets (None: not loaded)
    loaded_versions: tuple[int, ...]
    spec: ModelSpec | None  # the serving version's


class ModelRegistry:
    def __init__(self, repository: str | os.PathLike[str], *, config: EngineConfig | None = None,
                 metrics: Metrics | None = None, providers: Sequence[ProviderSpec] = (CPU_PROVIDER,),
                 session_options: Mapping[str, Any] | None = None, variant: str = DEFAULT_VARIANT,
                 drain_seconds: float = 30.0):
        self.repository = Path(repository)
        self.config = config if config is not None else EngineConfig()
        self.metrics = metrics if metrics is not None else Metrics()
        self.providers = tuple(providers)
        self.session_options = dict(session_options or {})
        self.variant = variant
        self.drain_seconds = drain_seconds
        self._versions: dict[str, dict[int, Path]] = {}
        self._engines: dict[Key, ModelEngine] = {}
        self._serving: dict[str, int] = {}
        self._loading: dict[Key, asyncio.Task] = {}
        self._failed: dict[Key, str] = {}
        self._retiring: set[asyncio.Task] = set()
        self._refresh_lock = asyncio.Lock()
        self.started = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and start the latest version of every model (a model that fails is logged and skipped)."""
        await self.refresh()
        self.started = True

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain and stop every engine (in-flight requests get `grace_seconds` to finish)."""
        grace = self.drain_seconds if grace_seconds is None else grace_seconds
        self.started = False
        engines = list(self._engines.values())
        self._engines.clear()
        self._serving.clear()
        await asyncio.gather(*(engine.stop(grace) for engine in engines), *self._retiring)

    async def poll(self, interval: float, after: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Refresh every `interval` seconds until cancelled (run it as a task), then call `after()` (the
        server's health, or the engine process's table, follows what the scan found)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # a broken bundle must not stop the server from serving the rest
                logger.exception("scanning model repository %s failed", self.repository)
            if after is not None:
                done = after()
                if done is not None:
                    await done

    # --- lookups --------------------------------------------------------------------------------

    async def get(self, name: str, version: int = 0) -> ModelEngine:
        """The engine serving `name` (version 0: the latest); a pinned version is loaded on first use.

        NotFound for an unknown model or version; Unavailable for one that failed to load.
        """
        if version == 0:
            serving = self._serving.get(name)
            if serving is not None:
                return self._engines[name, serving]
            versions = self._versions.get(name)
            if not versions:
                raise NotFound(f"unknown model {name!r}; this server has {self._known()}")
            key = (name, max(versions))
            raise Unavailable(f"model {name} is not loaded: {self._failed.get(key, 'it is loading')}")
        engine = self._engines.get((name, version))
        if engine is not None:
            return engine
        if version not in self._versions.get(name, {}):
            self._rescan()  # published since the last scan?
        path = self._versions.get(name, {}).get(version)
        if path is None:
            if name not in self._versions:
                raise NotFound(f"unknown model {name!r}; this server has {self._known()}")
            have = ", ".join(map(str, self._versions[name]))
            raise NotFound(f"model {name!r} has no version {version}; it has {have}")
        return await self._load((name, version), path)

    def models(self) -> list[ModelStatus]:
        statuses = []
        for name, versions in sorted(self._versions.items()):
            serving = self._serving.get(name)
            loaded = tuple(sorted(v for (n, v) in self._engines if n == name))
            spec = self._engines[name, serving].spec if serving is not None else None
            statuses.append(ModelStatus(name, tuple(sorted(versions)), serving, loaded, spec))
        return statuses

    def engines(self) -> list[ModelEngine]:
        return list(self._engines.values())

    # --- loading and swapping -------------------------------------------------------------------

    async def refresh(self) -> list[Key]:
        """Rescan; serve each model's latest version, retire versions replaced or gone. Returns the
        versions newly put into service."""
        async with self._refresh_lock:
            self._rescan()
            swapped = []
            for name, versions in self._versions.items():
                latest = max(versions)
                if self._serving.get(name) == latest or (name, latest) in self._failed:
                    continue
                try:
                    await self._load((name, latest), versions[latest])
                except Unavailable:
                    continue  # logged by _load; the previous version keeps serving
                previous = self._serving.get(name)
                self._serving[name] = latest
                swapped.append((name, latest))
                logger.info("model %s: now serving version %d%s", name, latest,
                            f" (was {previous})" if previous is not None else "")
                if previous is not None:
                    self._retire((name, previous))
            for key in [k for k in self._engines if k[1] not in self._versions.get(k[0], {})]:
                logger.info("model %s version %d left the repository; unloading it", *key)
                if self._serving.get(key[0]) == key[1]:
                    del self._serving[key[0]]
                self._retire(key)
            return swapped

    def _rescan(self) -> None:
        self._versions = scan_repository(self.repository)

    async def _load(self, key: Key, path: Path) -> ModelEngine:
        if key in self._engines:
            return self._engines[key]
        if key in self._failed:
            raise Unavailable(f"model {key[0]} version {key[1]} cannot be served: {self._failed[key]}")
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.create_task(self._open(key, path))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(key, None)

    async def _open(self, key: Key, path: Path) -> ModelEngine:
        name, version = key
        try:
            bundle = await asyncio.to_thread(
                load_bundle, path, self.providers, self.session_options, variant=self.variant,
                expected_name=name, expected_version=version)
        except Exception as error:  # BundleError, or ONNX Runtime failing to start a provider
            self._failed[key] = str(error)
            logger.error("model %s version %d failed to load: %s", name, version, error)
            raise Unavailable(f"model {name} version {version} cannot be served: {error}") from error
        engine = ModelEngine(bundle, self.config, self.metrics)
        await engine.start()
        self._engines[key] = engine
        return engine

    def _retire(self, key: Key) -> None:
        """Stop routing to `key`; its engine finishes what it has, then stops."""
        engine = self._engines.pop(key, None)
        if engine is None:
            return
        engine.stop_accepting()  # at once: whoever still holds it gets Unavailable, not a stale version
        task = asyncio.create_task(engine.stop(self.drain_seconds), name=f"retire {key[0]} v{key[1]}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _known(self) -> str:
        return ", ".join(sorted(self._versions)) or "no models"
