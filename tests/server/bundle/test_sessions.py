"""Tests of server/bundle/sessions.py: provider resolution and session options from configuration."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from server.bundle import make_session_options, resolve_providers

CPU = "CPUExecutionProvider"


def test_unavailable_providers_are_dropped_and_cpu_goes_last(monkeypatch, caplog) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    resolved = resolve_providers(
        [
            (CPU, {"arena_extend_strategy": "kSameAsRequested"}),
            "TensorrtExecutionProvider",
            ("CUDAExecutionProvider", {"device_id": 0}),
            "CUDAExecutionProvider",
        ]
    )
    assert resolved == [
        ("CUDAExecutionProvider", {"device_id": "0"}),
        (CPU, {"arena_extend_strategy": "kSameAsRequested"}),
    ]
    assert "TensorrtExecutionProvider is not in this ONNX Runtime build" in caplog.text
    assert resolve_providers([]) == [CPU]
    assert resolve_providers("CUDAExecutionProvider") == ["CUDAExecutionProvider", CPU]
    with pytest.raises(ValueError, match="neither a name nor"):
        resolve_providers([("CUDAExecutionProvider",)])


def test_session_options_are_applied_and_checked() -> None:
    options = make_session_options(
        {
            "intra_op_num_threads": 1,
            "inter_op_num_threads": 2,
            "graph_optimization_level": "basic",
            "execution_mode": "sequential",
        }
    )
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with pytest.raises(ValueError, match="unknown session option 'intra_threads'"):
        make_session_options({"intra_threads": 1})
    with pytest.raises(ValueError, match="graph_optimization_level must be one of disable, basic"):
        make_session_options({"graph_optimization_level": "max"})
    with pytest.raises(ValueError, match="must be a non-negative integer, got -1"):
        make_session_options({"intra_op_num_threads": -1})
