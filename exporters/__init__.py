"""Exporters: a training checkpoint -> ONNX graphs -> parity check against PyTorch -> a published bundle.

Submodules: `onnx_graphs` (export), `parity` (ONNX Runtime vs PyTorch), `variants` (fp16, int8),
`bundle` (metrics, manifest, atomic publishing) and `cli` (`seqserve export`, `seqserve inspect`).
Nothing heavy is imported here, so `seqserve inspect` starts without loading torch.
"""

from __future__ import annotations


class ExportError(Exception):
    """An export that must not be published; the message says what failed and what to try."""
