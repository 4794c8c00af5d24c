"""bench/engine_overhead.py: `--json` prints one object per row count with the fields a script checks."""

from __future__ import annotations

import json

import pytest

from bench import engine_overhead, models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bundle_dir(tmp_path_factory):
    bundle = models.build_lm_bundle(tmp_path_factory.mktemp("bench-cache"), models.TINY_LM, progress=lambda _: None)
    return bundle.repository / bundle.name / "1"


@pytest.mark.parametrize("io_binding", ["off", "on"])
def test_one_json_object_per_row_count(tiny_bundle_dir, capsys, io_binding):
    engine_overhead.main(["--json", "--bundle", str(tiny_bundle_dir), "--batches", "1,3", "--tokens", "5",
                          "--repeats", "1", "--threads", "1", "--io-binding", io_binding])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["rows"] for row in rows] == [1, 3]
    for row in rows:
        assert row["bare_ms"] > 0 and row["decode_ms"] > 0 and row["whole_step_ms"] > 0
        assert row["whole_step_over_bare"] == pytest.approx(row["whole_step_ms"] / row["bare_ms"])
        assert row["worker_cpu_ms"] >= 0 and row["ttft_steps"] > 0 and row["io_binding"] == io_binding
        if io_binding == "on":  # the log-probs come back every step; the state stays
            assert row["bytes_to_host_per_step"] > 0
