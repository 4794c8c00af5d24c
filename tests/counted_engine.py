"""An engine with metrics of its own, for tests that count what it did (tokens prefilled, rows parked)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from server.engine import ModelEngine
from server.metrics import Metrics


class Counted:
    """A `ModelEngine` of `bundle` and `config`; `value(name, **labels)` reads one of its model's series."""

    def __init__(self, bundle, config):
        self.registry = CollectorRegistry()
        self.engine = ModelEngine(bundle, config, Metrics(self.registry))

    def value(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, {"model": self.engine.name, **labels}) or 0.0

    @property
    def computed(self) -> float:
        """Tokens the prefill computed so far."""
        return self.value("seqserve_prefill_tokens_total")


def run_counted(bundle, config, body):
    """(what `await body(counted)` returns, the `Counted`), on an engine started for it and stopped after."""
    async def go():
        counted = Counted(bundle, config)
        await counted.engine.start()
        try:
            return await body(counted), counted
        finally:
            await counted.engine.stop(1.0)

    return asyncio.run(go())
