"""Numeric variants of the fp32 graphs (fp16 for GPUs, int8 dynamic quantisation for CPUs) and what
they cost in quality: the evaluation figures measured with any model, PyTorch or ONNX Runtime.

Both variants keep float32 inputs and outputs, so the server feeds every variant the same tensors and
keeps its state buffers in one dtype; only the arithmetic inside the graph changes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from exporters import ExportError
from exporters.onnx_graphs import graph_interface
from exporters.parity import Thresholds
from seqserve.v1.manifest_pb2 import Graph

VARIANTS = ("fp16", "int8")

# Variants are expected to differ from PyTorch; their figures are recorded, and only a collapse of
# greedy agreement (the model no longer produces what it was trained to) stops an export.
VARIANT_THRESHOLDS = {
    "fp16": Thresholds(max_abs_diff_log_probs=None, max_abs_diff_state=None, min_greedy_agreement=0.5,
                       min_beam_agreement=None),
    "int8": Thresholds(max_abs_diff_log_probs=None, max_abs_diff_state=None, min_greedy_agreement=0.5,
                       min_beam_agreement=None),
}

# Softmaxes stay float32 in the fp16 graph: the exp-and-sum loses the most in half precision, and the
# log-probs are what decoding ranks and reports.
_FP16_KEEP_FLOAT32 = ("LogSoftmax", "Softmax")


def parse_variants(text: str) -> list[str]:
    """'fp16,int8' -> ['fp16', 'int8']; fp32 is always exported and needs no mention."""
    names = [v.strip() for v in text.split(",") if v.strip()] if text else []
    unknown = [v for v in names if v not in VARIANTS and v != "fp32"]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return [v for v in dict.fromkeys(names) if v != "fp32"]


def variant_file(fp32_file: str, variant: str) -> str:
    """step.onnx -> step.int8.onnx."""
    stem, _, suffix = fp32_file.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def make_variant_graphs(directory: str | Path, fp32_graphs: list[Graph], variant: str) -> list[Graph]:
    """Write `variant` beside each fp32 graph in `directory`; their manifest entries, read from the files."""
    directory = Path(directory)
    graphs = []
    for fp32 in fp32_graphs:
        target = variant_file(fp32.file, variant)
        convert(directory / fp32.file, directory / target, variant)
        inputs, outputs = graph_interface(directory / target)
        graphs.append(Graph(role=fp32.role, variant=variant, file=target, inputs=inputs, outputs=outputs,
                            state_inputs=fp32.state_inputs, state_outputs=fp32.state_outputs))
    return graphs


def convert(source: Path, target: Path, variant: str) -> None:
    if variant == "fp16":
        to_fp16(source, target)
    elif variant == "int8":
        to_int8(source, target)
    else:
        raise ExportError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def to_fp16(source: Path, target: Path) -> None:
    """Float16 weights and arithmetic, float32 inputs and outputs.

    onnxconverter-common's converter ships inside onnxruntime (`onnxruntime.transformers.float16`), so
    no extra package is needed; it rewrites initializers, casts at the edges and keeps the ops that
    have no float16 kernels (and the softmaxes, above) in float32.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, *_FP16_KEEP_FLOAT32])
    # The converter appends the input casts after their consumers; ONNX requires producers first.
    sort_nodes_topologically(converted.graph)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(target))


def to_int8(source: Path, target: Path) -> None:
    """Dynamic quantisation: int8 weights for MatMul/Gemm/LSTM, activations quantised on the fly.

    LSTM layers become com.microsoft DynamicQuantizeLSTM (CPU); GRU and RNN layers stay float32,
    since ONNX Runtime has no quantised kernels for them.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs a hint about static-quantisation preprocessing on the root logger; it does
    # not apply to dynamic quantisation.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=False)
    finally:
        root.setLevel(level)


def sort_nodes_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so every node comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"graph {graph.name!r} has a cycle or an input nobody produces")
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


# --- quality ------------------------------------------------------------------------------------------

def evaluation_figures(model, tokenizers, kind: str, task: str, path: str | Path, limit: int = 0) -> dict:
    """The figures of `seqserve eval` (greedy) on a split file, for PyTorch or ONNX Runtime models alike."""
    from training.evaluate import evaluate_model

    return evaluate_model(model, tokenizers, kind, task, str(path), limit)


def quality_delta(variant_figures: dict, fp32_figures: dict) -> dict[str, float]:
    """Variant minus fp32 for every figure that is a quality measure (not a count)."""
    counts = {"tokens", "characters", "sources"}
    return {k: float(variant_figures[k]) - float(fp32_figures[k]) for k in fp32_figures
            if k in variant_figures and k not in counts and isinstance(fp32_figures[k], (int, float))}
