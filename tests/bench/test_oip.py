"""Smoke run of bench.oip's native loads against a real server on the repository's models (perf_analyzer
itself is fetched by bench/perf_analyzer_setup.sh and not run here)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from bench import oip

REPOSITORY = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def server():
    from server.app import ServerThread
    from server.config import ServerConfig

    config = ServerConfig(repository=str(REPOSITORY), port=0, metrics_port=-1, poll_interval_seconds=0,
                          log_level="warning")
    with ServerThread(config) as running:
        yield running


@pytest.mark.parametrize("one", [oip._translate, oip._sequence])
def test_the_native_loads_run_and_report(server, one):
    row = asyncio.run(oip._closed_loop(f"127.0.0.1:{server.port}", 2, 0.3, one))
    assert row["requests_per_s"] > 0 and row["responses_per_s"] >= row["requests_per_s"]
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("p50_ms", "p90_ms", "p99_ms"))
