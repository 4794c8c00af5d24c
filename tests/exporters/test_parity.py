"""exporters/parity.py: ONNX Runtime against PyTorch on tensors, greedy decoding and beam n-best lists."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from exporters.onnx_graphs import export_graphs, export_lm_prefill
from exporters.parity import (
    ParitySettings,
    Thresholds,
    check_parity,
    decode_inputs,
    open_ort_model,
    parity_failures,
    real_sequences,
    run_decoder,
)
from seqserve.v1.manifest_pb2 import ParityReport
from training.checkpoint import (
    config_from_checkpoint,
    find_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    tokenizers_from_checkpoint,
)
from training.data.files import read_documents, read_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ParitySettings(greedy_inputs=20, beam_inputs=8, max_new_tokens=20)


def load_run(run):
    payload = load_checkpoint(find_checkpoint(run))
    cfg = config_from_checkpoint(payload)
    model = model_from_checkpoint(payload)
    tokenizers = tokenizers_from_checkpoint(payload)
    texts = read_documents(cfg.test) if model.kind == "lm" else [s for s, _ in read_pairs(cfg.test)]
    return model, real_sequences(model.kind, texts, tokenizers, limit=100)


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_fp32_graphs_match_pytorch(tiny_runs, tmp_path, kind):
    model, real = load_run(tiny_runs["lstm", kind])
    graphs = export_graphs(model, tmp_path)
    report = check_parity(model, open_ort_model(tmp_path, graphs), real, settings=SMALL)

    assert report.passed, parity_failures(report)
    assert report.variant == "fp32"
    assert 0 < report.max_abs_diff_log_probs <= 1e-4 and report.max_abs_diff_state <= 1e-4
    assert (report.greedy_checked, report.greedy_matched) == (20, 20)
    assert (report.beam_checked, report.beam_matched) == (8, 8)
    assert list(report.providers) == ["CPUExecutionProvider"]
    assert dict(report.thresholds) == {"max_abs_diff_log_probs": 1e-4, "max_abs_diff_state": 1e-4,
                                       "min_greedy_agreement": 1.0, "min_beam_agreement": 1.0}
    grid = [c for c in report.cases if c.startswith(("random", "real"))]
    assert len(grid) == 2 * 3 * 3  # random/real x batch {1,3,64} x length {1,2,37}
    assert any(c.startswith("real batch=64 length=37") for c in grid)


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_decoding_compares_real_outputs(tiny_runs, tmp_path, kind):
    """Greedy agreement means something only if the tiny models produce more than <eos>."""
    model, real = load_run(tiny_runs["gru", kind])
    inputs = decode_inputs(kind, real, 20, seed=0)
    with torch.no_grad():
        greedy = run_decoder(model, inputs, SMALL, beam=False)
        n_best = run_decoder(model, inputs[:4], SMALL, beam=True)
    assert sum(len(tokens) > 0 for tokens in greedy) >= 10
    assert len({tuple(t) for t in greedy}) > 1
    assert all(len(hyps) == SMALL.beam_size for hyps in n_best)
    if kind == "lm":
        assert all(prompt[0] == 1 for prompt in inputs)  # <bos> first, then a cut of a document


def test_a_graph_that_differs_from_pytorch_fails(tiny_runs, tmp_path):
    model, real = load_run(tiny_runs["lstm", "lm"])
    graphs = export_graphs(model, tmp_path)
    with torch.no_grad():
        model.output.bias.add_(torch.linspace(-0.5, 0.5, model.output.bias.numel()))  # after the export
    report = check_parity(model, open_ort_model(tmp_path, graphs), real, settings=SMALL)
    assert not report.passed
    failures = parity_failures(report)
    assert any("fp32 log-probs differ from PyTorch by up to" in f and "limit 0.0001" in f for f in failures)


def test_a_prefill_graph_that_differs_from_pytorch_fails_on_states_and_log_probs(tiny_runs, tmp_path):
    model, real = load_run(tiny_runs["lstm", "lm"])
    graphs = export_graphs(model, tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.rnn.parameters()).add_(0.1)
    export_lm_prefill(other, tmp_path)  # overwrites prefill.onnx; step.onnx is still the model's
    report = check_parity(model, open_ort_model(tmp_path, graphs), real, settings=SMALL)
    assert report.max_abs_diff_log_probs > 1e-3 and report.max_abs_diff_state > 1e-3
    assert parity_failures(report)[:2] == [
        f"fp32 log-probs differ from PyTorch by up to {report.max_abs_diff_log_probs:.3g} (limit 0.0001)",
        f"fp32 states differ from PyTorch by up to {report.max_abs_diff_state:.3g} (limit 0.0001)"]


def test_a_prefill_graph_with_wrong_last_log_probs_fails_on_log_probs(tiny_runs, tmp_path):
    model, real = load_run(tiny_runs["lstm", "lm"])
    graphs = export_graphs(model, tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.output.bias.add_(0.1 * torch.arange(other.output.bias.numel()))  # the projection only
    export_lm_prefill(other, tmp_path)
    report = check_parity(model, open_ort_model(tmp_path, graphs), real, settings=SMALL)
    assert report.max_abs_diff_state <= 1e-4 and report.max_abs_diff_log_probs > 1e-3
    assert parity_failures(report)[0].startswith("fp32 log-probs differ from PyTorch by up to")


def test_parity_failures_name_each_figure():
    report = ParityReport(variant="int8", max_abs_diff_log_probs=math.nan, max_abs_diff_state=0.5,
                          greedy_checked=10, greedy_matched=4, beam_checked=10, beam_matched=0,
                          thresholds=Thresholds(max_abs_diff_state=None, min_beam_agreement=None,
                                                min_greedy_agreement=0.5).as_map())
    failures = parity_failures(report)
    assert failures == ["int8 log-probs differ from PyTorch by up to nan (limit 0.0001)",
                        "int8 greedy decoding matches PyTorch on 4/10 inputs (needs 50%)"]
    report.greedy_matched, report.max_abs_diff_log_probs = 5, 0.0
    assert parity_failures(report) == []
