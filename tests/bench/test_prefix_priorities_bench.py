"""Smoke runs of bench/prefix.py and bench/priorities.py on the repository's fortunes-lm with a few clients:
every figure of their reports is there and what they check for correctness holds (outputs identical with
the cache on and off; parked streams unchanged, nothing prefilled twice). Their speed targets are judged
by the full runs, never here."""

from __future__ import annotations

import json

from bench import prefix, priorities


def test_prefix_bench_cache_off_against_on(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    prefix.main(["--clients", "3", "--chars", "12", "--requests", "12", "--json", str(out)])
    report = json.loads(out.read_text())
    assert {(r["workload"], r["cache"]) for r in report["rows"]} == {
        (w, c) for w in ("autocomplete", "preamble") for c in ("off", "on")}
    off, on = ({r["workload"]: r for r in report["rows"] if r["cache"] == c} for c in ("off", "on"))
    assert off["autocomplete"]["requests"] == 36 and off["preamble"]["requests"] == 12
    for workload in ("autocomplete", "preamble"):
        assert report["checks"][workload]["outputs_identical"]
        assert on[workload]["prompt_tokens"] == off[workload]["prompt_tokens"]
        assert off[workload]["cache_saved"] == 0 and off[workload]["prefill_computed"] == off[workload]["prompt_tokens"]
        assert on[workload]["prefill_computed"] + on[workload]["cache_saved"] == on[workload]["prompt_tokens"]
        assert on[workload]["cache_saved"] > 0
    assert "| autocomplete | on |" in capsys.readouterr().out


def test_priorities_bench_parks_and_changes_nothing(tmp_path):
    out = tmp_path / "priorities.json"
    priorities.main(["--rows", "4", "--lows", "8", "--low-tokens", "200", "--highs", "2", "--json", str(out)])
    report = json.loads(out.read_text())
    figures, checks = report["figures"], report["checks"]
    # Whether rows were parked depends on when the client's requests arrive (the engine's tests prove
    # parking); what the harness checks of the outputs holds either way.
    assert checks["low_texts_identical"] and checks["nothing_recomputed"]
    assert figures["low_streams_identical"] == "8/8" and figures["preemptions_alone"] == 0
    assert figures["reference_preemptions"] == 0 and figures["high_ttft_p50_ms"] > 0
