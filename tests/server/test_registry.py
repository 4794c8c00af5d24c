"""server/registry.py: latest versions served, pinned versions on demand, hot swap while requests run."""

from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client import CollectorRegistry

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from server.decoding import DecodingParams, FinishReason
from server.decoding.limits import RequestLimits
from server.engine import EngineConfig, GenerationRequest
from server.errors import NotFound
from server.metrics import Metrics
from server.registry import ModelRegistry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))
ENDLESS_TOKENS = 1_000_000  # no machine reaches it: the in-flight request outlives the swap, then is cancelled
LONG = DecodingParams(max_new_tokens=ENDLESS_TOKENS, min_new_tokens=ENDLESS_TOKENS)


@pytest.fixture(scope="module")
def versions(tiny_runs, tmp_path_factory):
    """A repository holding tiny-lm v1, and a v2 exported elsewhere, ready to be published by a rename."""
    root = tmp_path_factory.mktemp("registry")
    run = tiny_runs["lstm", "lm"]
    export_run(run, root / "models", "tiny-lm", version=1, options=SMALL_EXPORT)
    v2 = export_run(run, root / "staging", "tiny-lm", version=2, options=SMALL_EXPORT).path
    return root / "models", v2


async def wait_for(condition, timeout=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_hot_swap_new_requests_go_to_the_new_version_in_flight_ones_finish_on_the_old(versions):
    repository, v2 = versions
    prom = CollectorRegistry()
    config = EngineConfig(limits=RequestLimits(max_new_tokens=ENDLESS_TOKENS))
    registry = ModelRegistry(repository, config=config, metrics=Metrics(prom),
                             session_options={"intra_op_num_threads": 1}, drain_seconds=30)

    def info(version):
        return prom.get_sample_value("seqserve_model_info", {"model": "tiny-lm", "version": str(version),
                                                              "cell": "lstm", "provider": "CPUExecutionProvider"})

    def load():
        """(rows in use, requests queued) of tiny-lm, both versions together: the engines' gauges."""
        return (prom.get_sample_value("seqserve_active_rows", {"model": "tiny-lm"}),
                prom.get_sample_value("seqserve_queue_depth", {"model": "tiny-lm"}))

    async def go():
        await registry.start()
        old = await registry.get("tiny-lm")
        assert old.version == 1 and info(1) == 1
        in_flight = old.submit(GenerationRequest("old", [1, 5], LONG))
        assert (await in_flight.__anext__()).token_ids  # it is running

        poller = asyncio.create_task(registry.poll(0.02))
        os.rename(v2, repository / "tiny-lm" / "2")  # publish, as the exporter does
        await wait_for(lambda: registry.models()[0].serving_version == 2)
        new = await registry.get("tiny-lm")
        assert new.version == 2 and new is not old
        # Draining: in-flight work goes on. v2 runs nothing yet, so the model's one row in use is v1's.
        assert not old.accepting and load() == (1, 0)
        fresh = await new.submit(GenerationRequest("new", [1, 5], DecodingParams(max_new_tokens=5))).result()
        assert fresh.reason is FinishReason.LENGTH

        # The old version goes on decoding its in-flight request until that request ends (v2's is done).
        for _ in range(20):
            assert (await in_flight.__anext__()).token_ids
        assert load() == (1, 0)
        in_flight.cancel()
        rest = [event async for event in in_flight]
        finish = rest[-1]
        assert finish.reason is FinishReason.CANCELLED and len(finish.generated_ids) > 20
        await wait_for(lambda: info(1) is None)  # the old engine stopped once it was empty
        assert info(2) == 1 and load() == (0, 0)  # nothing left on either version
        # The retired version's prefix states went with it; the model's gauge now holds v2's alone.
        assert old.prefix_cache.states == 0 and old.prefix_cache.bytes == 0
        assert prom.get_sample_value("seqserve_prefix_cache_bytes", {"model": "tiny-lm"}) == \
            new.prefix_cache.bytes > 0

        pinned = await registry.get("tiny-lm", 1)  # loaded again, on demand
        assert pinned.version == 1 and pinned is not old
        assert (await pinned.submit(GenerationRequest("p", [1], DecodingParams(max_new_tokens=3))).result()).reason
        status = registry.models()[0]
        assert (status.name, status.versions, status.serving_version, status.loaded_versions) == \
            ("tiny-lm", (1, 2), 2, (1, 2))
        assert status.spec.version == 2

        with pytest.raises(NotFound, match="unknown model 'nope'"):
            await registry.get("nope")
        with pytest.raises(NotFound, match="has no version 7"):
            await registry.get("tiny-lm", 7)
        poller.cancel()
        await registry.stop(1.0)
        assert registry.engines() == []

    asyncio.run(go())
