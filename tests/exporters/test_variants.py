"""exporters/variants.py: fp16 and int8 graphs keep the interface, are measured, and ship beside fp32."""

from __future__ import annotations

import json

import onnx
import pytest

import exporters.bundle as bundle_module
from exporters import ExportError
from exporters.bundle import ExportOptions, export_run
from exporters.onnx_graphs import check_recurrent_ops, export_graphs, op_type_counts
from exporters.parity import ParitySettings, Thresholds
from exporters.variants import make_variant_graphs, parse_variants, quality_delta, variant_file
from server.bundle import load_bundle
from training.models import LanguageModel, LMArgs, Seq2Seq, Seq2SeqArgs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ExportOptions(eval_limit=20, real_inputs=100,
                      parity=ParitySettings(greedy_inputs=20, beam_inputs=4, max_new_tokens=20))


def test_parse_variants():
    assert parse_variants("") == []
    assert parse_variants("int8, fp16,int8,fp32") == ["int8", "fp16"]
    with pytest.raises(ValueError, match="unknown variant.*fp8.*choose from fp16, int8"):
        parse_variants("fp16,fp8")
    assert variant_file("decoder_step.onnx", "int8") == "decoder_step.int8.onnx"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_variant_graphs_keep_float32_interface(tmp_path, cell):
    model = Seq2Seq(Seq2SeqArgs(source_vocab_size=13, target_vocab_size=9, cell=cell, embedding_size=8,
                                hidden_size=10, num_layers=2)).eval()
    fp32 = export_graphs(model, tmp_path)
    for variant in ("fp16", "int8"):
        graphs = make_variant_graphs(tmp_path, fp32, variant)
        for graph, reference in zip(graphs, fp32, strict=True):
            assert graph.variant == variant and graph.role == reference.role
            assert list(graph.inputs) == list(reference.inputs)
            assert list(graph.outputs) == list(reference.outputs)
            assert list(graph.state_inputs) == list(reference.state_inputs)
            proto = onnx.load(str(tmp_path / graph.file))
            onnx.checker.check_model(proto)  # includes: nodes in topological order
            counts = op_type_counts(tmp_path / graph.file)
            if variant == "fp16":
                assert {i.data_type for i in proto.graph.initializer if i.data_type in (1, 10)} == {10}
                assert counts[cell.upper()] == 2
            elif cell == "lstm":
                assert counts["DynamicQuantizeLSTM"] == 2 and counts["LSTM"] == 0
            else:
                assert counts["GRU"] == 2  # ONNX Runtime has no quantised GRU: it stays float32


def test_export_with_variants_records_parity_and_quality(tiny_runs, tmp_path):
    options = ExportOptions(variants=("fp16", "int8"), eval_limit=20, real_inputs=100,
                            parity=SMALL.parity)
    result = export_run(tiny_runs["lstm", "lm"], tmp_path / "models", "lm", options=options)
    manifest = result.manifest
    assert sorted((g.variant, g.file) for g in manifest.graphs) == [
        ("fp16", "prefill.fp16.onnx"), ("fp16", "step.fp16.onnx"), ("fp32", "prefill.onnx"),
        ("fp32", "step.onnx"), ("int8", "prefill.int8.onnx"), ("int8", "step.int8.onnx")]
    for graph in manifest.graphs:
        check_recurrent_ops(result.path / graph.file, "lstm", layers=manifest.sizes.num_layers)
    reports = {r.variant: r for r in manifest.parity}
    assert set(reports) == {"fp32", "fp16", "int8"}
    for variant in ("fp16", "int8"):
        report = reports[variant]
        assert report.passed and dict(report.thresholds) == {"min_greedy_agreement": 0.5}
        assert report.max_abs_diff_log_probs > 0 and report.greedy_checked == 20
        assert set(report.quality_delta) >= {"bits_per_character", "perplexity", "nll_per_token"}
        assert "tokens" not in report.quality_delta  # counts are not quality
        bundle = load_bundle(result.path, variant=variant)
        assert bundle.graph("step").spec.file == f"step.{variant}.onnx"
        assert bundle.graph("prefill").spec.file == f"prefill.{variant}.onnx"
    assert reports["fp16"].max_abs_diff_log_probs < reports["int8"].max_abs_diff_log_probs
    metrics = json.loads((result.path / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"fp16", "int8"}
    delta = metrics["variants"]["int8"]["bits_per_character"] - metrics["bits_per_character"]
    assert reports["int8"].quality_delta["bits_per_character"] == pytest.approx(delta)


def test_collapsed_greedy_agreement_refuses_to_publish(tiny_runs, tmp_path, monkeypatch):
    impossible = Thresholds(max_abs_diff_log_probs=None, max_abs_diff_state=None, min_greedy_agreement=1.01,
                            min_beam_agreement=None)
    monkeypatch.setitem(bundle_module.VARIANT_THRESHOLDS, "int8", impossible)
    options = ExportOptions(variants=("int8",), eval_limit=20, real_inputs=100, parity=SMALL.parity)
    with pytest.raises(ExportError, match="int8 greedy decoding matches PyTorch on .*/20 inputs"):
        export_run(tiny_runs["gru", "lm"], tmp_path / "models", "lm", options=options)
    assert not (tmp_path / "models" / "lm" / "1").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []


def test_quality_delta_skips_counts_and_text():
    delta = quality_delta({"bleu": 20.0, "sources": 5, "wer": 0.5, "split": "x"},
                          {"bleu": 21.5, "sources": 5, "wer": 0.25, "split": "x"})
    assert delta == {"bleu": -1.5, "wer": 0.25}


def test_tied_lm_variants(tmp_path):
    model = LanguageModel(LMArgs(vocab_size=11, cell="lstm", embedding_size=10, hidden_size=10, num_layers=1,
                                 tie_weights=True)).eval()
    fp32 = export_graphs(model, tmp_path)
    for variant in ("fp16", "int8"):
        step, prefill = make_variant_graphs(tmp_path, fp32, variant)
        assert (step.role, prefill.role, prefill.file) == ("step", "prefill", f"prefill.{variant}.onnx")
        assert list(prefill.outputs)[:-1] == list(step.outputs)[1:]
        assert (prefill.outputs[-1].name, prefill.outputs[-1].dtype) == ("last_log_probs", "float32")
        for graph in (step, prefill):
            onnx.checker.check_model(onnx.load(str(tmp_path / graph.file)))
            check_recurrent_ops(tmp_path / graph.file, "lstm", layers=1)
