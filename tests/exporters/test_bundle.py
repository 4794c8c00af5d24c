"""exporters/bundle.py: train -> export -> load_bundle -> parity for every cell x kind; atomic publishing."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch

import exporters.bundle as bundle_module
from exporters import ExportError
from exporters.bundle import ExportOptions, export_run, next_version
from exporters.parity import ParitySettings, Thresholds, check_parity, ort_model_from_bundle, real_sequences
from seqserve.bundle import BundleError, scan_repository, sha256_file
from seqserve.v1.manifest_pb2 import ModelKind
from server.bundle import load_bundle
from training.checkpoint import (
    config_from_checkpoint,
    find_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    tokenizers_from_checkpoint,
)
from training.data.files import read_documents, read_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ExportOptions(eval_limit=20, real_inputs=100,
                      parity=ParitySettings(greedy_inputs=20, beam_inputs=6, max_new_tokens=20))


def repository_entries(repository) -> list[str]:
    """Everything under the repository, hidden staging directories included."""
    if not repository.exists():
        return []
    return sorted(str(p.relative_to(repository)) for p in repository.rglob("*"))


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_train_export_load_parity_round_trip(tiny_runs, tmp_path, cell, kind):
    run = tiny_runs[cell, kind]
    name = f"tiny-{kind}-{cell}"
    result = export_run(run, tmp_path / "models", name, options=SMALL)

    assert result.path == tmp_path / "models" / name / "1"
    assert scan_repository(tmp_path / "models") == {name: {1: result.path}}
    bundle = load_bundle(result.path, expected_name=name, expected_version=1)
    manifest = bundle.manifest
    assert manifest.kind == (ModelKind.MODEL_KIND_LM if kind == "lm" else ModelKind.MODEL_KIND_SEQ2SEQ)
    assert manifest.cell == cell and manifest.opset == 17 and manifest.schema_version == 1
    state = ["h", "c"] if cell == "lstm" else ["h"]
    if kind == "lm":
        assert dict(manifest.tokenizers) == {"text": "tokenizer.json"}
        step, prefill = manifest.graphs
        assert list(step.state_inputs) == state and list(step.state_outputs) == [f"{s}_out" for s in state]
        assert (prefill.role, prefill.file) == ("prefill", "prefill.onnx")
        assert list(prefill.inputs) == list(step.inputs) and list(prefill.outputs)[:-1] == list(step.outputs)[1:]
        assert prefill.outputs[-1].name == "last_log_probs"
        assert set(bundle.graphs) == {"step", "prefill"}
    else:
        assert dict(manifest.tokenizers) == {"source": "source_tokenizer.json",
                                             "target": "target_tokenizer.json"}
        encoder, decoder = manifest.graphs
        assert list(encoder.state_inputs) == []
        assert list(encoder.state_outputs) == [f"{s}_out" for s in [*state, "input_feed"]]
        assert list(decoder.state_inputs) == [*state, "input_feed"]
        assert manifest.sizes.attention == "general" and manifest.sizes.bidirectional_encoder
        assert manifest.sizes.encoder_hidden_size == manifest.sizes.hidden_size // 2
    files = {p.name for p in result.path.iterdir()} - {"manifest.json"}
    assert set(manifest.sha256) == files
    assert all(sha256_file(result.path / f) == digest for f, digest in manifest.sha256.items())
    (report,) = manifest.parity
    assert report.passed and report.max_abs_diff_log_probs <= 1e-4
    assert report.greedy_matched == report.greedy_checked == 20
    assert manifest.training["checkpoint"] == "best.pt" and manifest.training["task"] in ("text", "g2p")
    metrics = json.loads((result.path / "metrics.json").read_text())
    expected = "bits_per_character" if kind == "lm" else "per"
    assert manifest.metrics[expected] == pytest.approx(metrics[expected])
    assert set(result.seconds) >= {"export", "parity_fp32", "metrics", "manifest", "publish", "total"}

    # Parity once more, through the sessions the server's own loader opened.
    payload = load_checkpoint(find_checkpoint(run))
    cfg = config_from_checkpoint(payload)
    texts = read_documents(cfg.valid) if kind == "lm" else [s for s, _ in read_pairs(cfg.valid)]
    real = real_sequences(kind, texts, tokenizers_from_checkpoint(payload), limit=50)
    again = check_parity(model_from_checkpoint(payload), ort_model_from_bundle(bundle), real,
                         settings=ParitySettings(greedy_inputs=10, beam_inputs=4, max_new_tokens=15))
    assert again.passed


def test_versions_count_up_and_are_never_overwritten(tiny_runs, tmp_path):
    repository = tmp_path / "models"
    assert next_version(repository, "lm") == 1
    first = export_run(tiny_runs["rnn", "lm"], repository, "lm", options=SMALL)
    second = export_run(tiny_runs["rnn", "lm"], repository, "lm", options=SMALL)
    assert (first.manifest.version, second.manifest.version) == (1, 2)
    assert next_version(repository, "lm") == 3 and next_version(repository, "other") == 1
    before = (first.path / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="already exists; versions are never overwritten"):
        export_run(tiny_runs["rnn", "lm"], repository, "lm", version=1, options=SMALL)
    assert (first.path / "manifest.json").read_bytes() == before
    pinned = export_run(tiny_runs["rnn", "lm"], repository, "lm", version=7, options=SMALL)
    assert pinned.path.name == "7" and next_version(repository, "lm") == 8


def test_bad_names_are_refused_before_anything_is_written(tiny_runs, tmp_path):
    for bad in ("Upper", "../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="model name"):
            export_run(tiny_runs["rnn", "lm"], tmp_path / "models", bad, options=SMALL)
    assert not (tmp_path / "models").exists()


def test_zero_tolerance_refuses_to_publish(tiny_runs, tmp_path):
    options = dataclasses.replace(SMALL, thresholds=Thresholds(max_abs_diff_log_probs=0.0))
    with pytest.raises(ExportError, match="parity check failed, nothing was published: fp32 log-probs"):
        export_run(tiny_runs["rnn", "lm"], tmp_path / "models", "lm", options=options)
    assert repository_entries(tmp_path / "models") == []


def test_a_weight_changed_after_export_refuses_to_publish(tiny_runs, tmp_path, monkeypatch):
    real_export = bundle_module.export_graphs

    def export_then_perturb(model, directory):
        graphs = real_export(model, directory)
        with torch.no_grad():
            model.embedding.weight.mul_(1.5)  # PyTorch now computes something the graph does not
        return graphs

    monkeypatch.setattr(bundle_module, "export_graphs", export_then_perturb)
    with pytest.raises(ExportError, match="parity check failed") as error:
        export_run(tiny_runs["lstm", "lm"], tmp_path / "models", "lm", options=SMALL)
    assert "greedy mismatch on input" in str(error.value) or "log-probs differ" in str(error.value)
    assert repository_entries(tmp_path / "models") == []


@pytest.mark.parametrize("stage", ["write_manifest", "load_bundle", "rename"])
def test_a_failure_at_any_stage_leaves_no_partial_directory(tiny_runs, tmp_path, monkeypatch, stage):
    def fail(*args, **kwargs):
        raise OSError(f"simulated failure in {stage}")

    if stage == "rename":
        monkeypatch.setattr(bundle_module.os, "rename", fail)
    else:
        monkeypatch.setattr(bundle_module, stage, fail)
    with pytest.raises(OSError, match="simulated failure"):
        export_run(tiny_runs["rnn", "lm"], tmp_path / "models", "lm", options=SMALL)
    # The model directory may exist (it is made just before the rename), but never a version or a staging dir.
    assert [e for e in repository_entries(tmp_path / "models") if e != "lm"] == []


def test_work_in_progress_is_hidden_from_repository_scans(tiny_runs, tmp_path, monkeypatch):
    seen = {}
    real_publish = bundle_module.publish

    def spy(staging, target):
        seen["staging"] = staging
        seen["scan"] = scan_repository(tmp_path / "models")
        seen["files"] = sorted(p.name for p in staging.iterdir())
        real_publish(staging, target)

    monkeypatch.setattr(bundle_module, "publish", spy)
    result = export_run(tiny_runs["rnn", "lm"], tmp_path / "models", "lm", options=SMALL)
    assert seen["staging"].name.startswith(".") and seen["staging"].parent == tmp_path / "models"
    assert seen["scan"] == {}
    assert seen["files"] == ["manifest.json", "metrics.json", "prefill.onnx", "step.onnx", "tokenizer.json"]
    assert not seen["staging"].exists() and result.path.is_dir()
    # Published with ordinary permissions, not the private ones of a temporary directory.
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((result.path / "manifest.json").stat().st_mode) == 0o666 & ~umask


def test_missing_corpus_is_named(tiny_runs, tmp_path):
    payload = load_checkpoint(find_checkpoint(tiny_runs["rnn", "lm"]))
    payload["config"].update(test="gone/test.txt", valid="gone/valid.txt")
    checkpoint = tmp_path / "moved.pt"
    torch.save(payload, checkpoint)
    with pytest.raises(ExportError, match=r"test='gone/test.txt', valid='gone/valid.txt'"):
        export_run(checkpoint, tmp_path / "models", "lm", options=SMALL)
    assert repository_entries(tmp_path / "models") == []


def test_a_corrupted_published_bundle_is_refused_naming_the_file(tiny_runs, tmp_path):
    result = export_run(tiny_runs["gru", "seq2seq"], tmp_path / "models", "g2p", options=SMALL)
    graph = result.path / "decoder_step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for decoder_step.onnx"):
        load_bundle(result.path)
    (result.path / "target_tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing file target_tokenizer.json"):
        load_bundle(result.path)


def test_an_lm_bundle_without_a_prefill_graph_still_loads_and_serves(tiny_runs, tmp_path):
    """Bundles published before prefill.onnx existed: step only; the runner prefills through step."""
    from seqserve.bundle import read_manifest, write_manifest
    from server.engine.runner import Runner

    result = export_run(tiny_runs["lstm", "lm"], tmp_path / "models", "lm", options=SMALL)
    with_prefill = load_bundle(result.path)
    manifest = read_manifest(result.path / "manifest.json")
    kept = [g for g in manifest.graphs if g.role != "prefill"]
    del manifest.graphs[:]
    manifest.graphs.extend(kept)
    del manifest.sha256["prefill.onnx"]
    (result.path / "prefill.onnx").unlink()
    write_manifest(manifest, result.path / "manifest.json")
    without = load_bundle(result.path)
    assert set(without.graphs) == {"step"}
    # The state-only graph and step's state outputs agree.
    sequences = [[1, 5, 6, 7], [1], [1, 9, 4]]
    runners = [Runner(with_prefill), Runner(without)]
    assert runners[0]._prefill is not None and runners[1]._prefill is None
    states = [r.prefill(sequences, r.zero_state(len(sequences)), want_last=True) for r in runners]
    for got, expected in zip(states[0][0], states[1][0], strict=True):
        assert got.shape == expected.shape
        assert abs(got - expected).max() <= 1e-5
    assert states[0][1] is None and states[1][1] is None  # every position's log-probs: not asked for
    # The log-probs after each row's last token: the prefill graph's own, or picked out of step's.
    assert states[0][2].shape == states[1][2].shape == (3, without.manifest.sizes.vocab_size)
    assert abs(states[0][2] - states[1][2]).max() <= 1e-5
