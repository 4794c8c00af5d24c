"""bench/overhead_ab.py: both checkouts run on one bundle, in turns, and the medians come out per tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import models, overhead_ab

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]


def test_two_checkouts_side_by_side(tmp_path, capsys):
    bundle = models.build_lm_bundle(tmp_path, models.TINY_LM, progress=lambda _: None)
    overhead_ab.main(["--before", str(ROOT), "--after", str(ROOT), "--rounds", "2", "--batches", "1,2",
                      "--tokens", "4", "--bundle", str(bundle.repository / bundle.name / "1"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["rounds"] == 2 and set(result["trees"]) == {"before", "after"}
    for tree in ("before", "after"):
        assert sorted(result[tree]) == ["1", "2"]  # JSON keys: the row counts
        for figures in result[tree].values():
            assert set(figures) == set(overhead_ab.FIGURES)
            assert figures["tokens_per_s"] > 0 and figures["whole_step_ms"] > 0 and figures["bare_ms"] > 0
