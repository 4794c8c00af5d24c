"""Smoke run of bench/session_stores.py (`bench/sessions.py --stores`): memory, SQLite and a real
redis-server side by side on a tiny random-weight bundle, two sessions for one round; every figure of
the report is there (the harness must not rot; its numbers are not judged here)."""

from __future__ import annotations

import pytest

from bench import models, session_stores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_stores_side_by_side(tmp_path):
    bundle = models.build_lm_bundle(tmp_path / "cache", models.TINY_LM, progress=lambda _: None)
    results = session_stores.compare(bundle.repository, bundle.name, models.lm_words(models.TINY_LM),
                                     sessions=2, rounds=1, repeats=1, new_tokens=4, feed_words=2)
    assert set(results) == {"memory", "sqlite", "redis"}
    for figures in results.values():
        assert figures["tokens_per_s"] > 0 and len(figures["tokens_per_s_runs"]) == 1
        assert figures["stored_bytes_per_session"] > 0
        assert 0 < figures["feed_p50_s"] <= figures["feed_p99_s"]
    state_bytes = results["memory"]["stored_bytes_per_session"]
    assert results["sqlite"]["stored_bytes_per_session"] > state_bytes  # the state and its header
    table = session_stores.report(results, sessions=2)
    assert table.count("\n") == 4 and "| sqlite |" in table and "| redis |" in table
