"""PyTorch models -> ONNX graphs whose recurrent state is an explicit input and output.

LM: `step.onnx` (tokens[B,T], lengths[B], h[, c]) -> (log_probs[B,T,V], h_out[, c_out]), for decoding
and prefill that wants every position's log-probs, and `prefill.onnx` with the same inputs ->
(h_out[, c_out], last_log_probs[B,V]): prefill of a prompt needs the state and the next token's
log-probs only, and the vocabulary projection + log-softmax of every other position are most of an LM
step's FLOPs. seq2seq: `encoder.onnx` (src[B,S], src_lengths[B]) -> (memory, mask, h_out[, c_out],
input_feed_out) and `decoder_step.onnx` (prev_token[B], h[, c], input_feed, memory, mask) ->
(log_probs[B,V], h_out[, c_out], input_feed_out, attention[B,S]).

The TorchScript exporter (`dynamo=False`) turns packed sequences into ONNX LSTM/GRU/RNN ops with
`sequence_lens`; its output shapes are unreliable (frozen or misnamed axes), so every input and output
shape is declared here and written into the graph, then checked by ONNX's strict shape inference.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from exporters import ExportError
from seqserve.bundle.manifest import LAST_LOG_PROBS  # the prefill graph's output after its state outputs
from seqserve.v1.manifest_pb2 import Graph, TensorSpec
from training.models.rnn import num_state_tensors

OPSET = 17
# Bumped when the graphs exported for a model change (2: the LM's prefill.onnx returns last_log_probs).
GRAPH_FORMAT = 2
ONNX_RECURRENT_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
# Ops that would mean a recurrence was unrolled or looped instead of mapped to one ONNX RNN op.
_LOOP_OPS = frozenset({"Loop", "Scan", "If"})

GRAPH_FILES = {"step": "step.onnx", "prefill": "prefill.onnx", "encoder": "encoder.onnx",
               "decoder_step": "decoder_step.onnx"}
BATCH, TIME, SOURCE_TIME = "batch", "time", "src_time"

# The example the tracer runs: every row a different length, none equal to a fixed size, so nothing
# specific to the example can hide behind a coincidence (the shapes are checked at other sizes later).
_EXAMPLE_LENGTHS = (7, 3, 5)

_DTYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.BOOL: "bool",
}
_ELEM_TYPES = {name: elem for elem, name in _DTYPE_NAMES.items()}


def cell_state_names(cell: str) -> list[str]:
    """Names of a cell's state tensors, in the model's state order."""
    return ["h", "c"][: num_state_tensors(cell)]


def output_name(state_name: str) -> str:
    return f"{state_name}_out"


def spec(name: str, dtype: str, *shape) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=[str(d) for d in shape])


def export_graphs(model: nn.Module, directory: str | Path, opset: int = OPSET) -> list[Graph]:
    """Export every graph of `model` (an LM or a Seq2Seq) into `directory`; manifest entries, variant fp32."""
    directory = Path(directory)
    model.eval()
    if model.kind == "lm":
        return [export_lm(model, directory, opset), export_lm_prefill(model, directory, opset)]
    if model.kind == "seq2seq":
        return [export_encoder(model, directory, opset), export_decoder_step(model, directory, opset)]
    raise ExportError(f"cannot export a model of kind {model.kind!r}")


def export_lm(model, directory: Path, opset: int = OPSET) -> Graph:
    """`step.onnx`: log-probs of every position and the new state."""
    args = model.args
    names, inputs, state_outputs, example = _lm_interface(model)
    outputs = [spec("log_probs", "float32", BATCH, TIME, args.vocab_size), *state_outputs]
    module = _Flat(model, type(model).forward)
    return _export(module, example, directory, "step", inputs, outputs, names, opset)


def export_lm_prefill(model, directory: Path, opset: int = OPSET) -> Graph:
    """`prefill.onnx`: step's inputs -> step's state outputs, then `last_log_probs` [B, V], the log-probs
    after each row's last token (row b's position lengths[b] - 1): the vocabulary projection and softmax
    run once per row, not once per position."""
    names, inputs, state_outputs, example = _lm_interface(model)
    outputs = [*state_outputs, spec(LAST_LOG_PROBS, "float32", BATCH, model.args.vocab_size)]
    module = _Flat(model, _lm_prefill_flat)
    return _export(module, example, directory, "prefill", inputs, outputs, names, opset)


def _lm_interface(model) -> tuple[list[str], list[TensorSpec], list[TensorSpec], tuple]:
    """An LM graph's state names, inputs, state outputs and the example the tracer runs."""
    args = model.args
    names = cell_state_names(args.cell)
    state_shape = (BATCH, args.num_layers, args.hidden_size)
    inputs = [spec("tokens", "int64", BATCH, TIME), spec("lengths", "int64", BATCH)]
    inputs += [spec(n, "float32", *state_shape) for n in names]
    state_outputs = [spec(output_name(n), "float32", *state_shape) for n in names]
    lengths = torch.tensor(_EXAMPLE_LENGTHS)
    batch = len(_EXAMPLE_LENGTHS)
    tokens = torch.randint(0, args.vocab_size, (batch, int(lengths.max())), generator=_example_generator())
    return names, inputs, state_outputs, (tokens, lengths, *model.initial_state(batch))


def _lm_prefill_flat(model, tokens, lengths, *state):
    """`LanguageModel.recur` with flat state -> (*state, log-probs of each row's last position)."""
    out, new_state = model.recur(tokens, lengths, tuple(state))
    last = (lengths - 1)[:, None, None].expand(-1, 1, out.shape[2])
    log_probs = torch.log_softmax(model.project(out.gather(1, last)[:, 0]), dim=-1)
    return (*new_state, log_probs)


def decoder_state(args) -> list[tuple[str, tuple]]:
    """(name, shape) of each decoder state tensor: the cell's, then input_feed."""
    layered = (BATCH, args.num_layers, args.hidden_size)
    return [(n, layered) for n in cell_state_names(args.cell)] + [("input_feed", (BATCH, args.hidden_size))]


def export_encoder(model, directory: Path, opset: int = OPSET) -> Graph:
    args = model.args
    state = decoder_state(args)
    inputs = [spec("src", "int64", BATCH, SOURCE_TIME), spec("src_lengths", "int64", BATCH)]
    outputs = [spec("memory", "float32", BATCH, SOURCE_TIME, args.hidden_size),
               spec("mask", "float32", BATCH, SOURCE_TIME)]
    outputs += [spec(output_name(n), "float32", *shape) for n, shape in state]
    lengths = torch.tensor(_EXAMPLE_LENGTHS)
    src = torch.randint(0, args.source_vocab_size, (len(lengths), int(lengths.max())),
                        generator=_example_generator())
    module = _Flat(model, _encode_flat)
    graph = _export(module, (src, lengths), directory, "encoder", inputs, outputs, [], opset)
    # The encoder's state outputs are the decoder's initial state; it takes none in.
    graph.state_outputs[:] = [output_name(n) for n, _ in state]
    return graph


def export_decoder_step(model, directory: Path, opset: int = OPSET) -> Graph:
    args = model.args
    state = decoder_state(args)
    memory_spec = spec("memory", "float32", BATCH, SOURCE_TIME, args.hidden_size)
    mask_spec = spec("mask", "float32", BATCH, SOURCE_TIME)
    inputs = [spec("prev_token", "int64", BATCH)]
    inputs += [spec(n, "float32", *shape) for n, shape in state]
    inputs += [memory_spec, mask_spec]
    outputs = [spec("log_probs", "float32", BATCH, args.target_vocab_size)]
    outputs += [spec(output_name(n), "float32", *shape) for n, shape in state]
    outputs += [spec("attention", "float32", BATCH, SOURCE_TIME)]
    lengths = torch.tensor(_EXAMPLE_LENGTHS)
    gen = _example_generator()
    src = torch.randint(0, args.source_vocab_size, (len(lengths), int(lengths.max())), generator=gen)
    with torch.no_grad():
        memory, mask, initial = model.eval().encode(src, lengths)
    prev = torch.randint(0, args.target_vocab_size, (len(lengths),), generator=gen)
    module = _Flat(model, type(model).decode_step)
    names = [n for n, _ in state]
    example = (prev, *initial, memory, mask)
    return _export(module, example, directory, "decoder_step", inputs, outputs, names, opset)


def _example_generator() -> torch.Generator:
    # Seeded and private: exporting never moves the global RNG and always traces the same example.
    return torch.Generator().manual_seed(0)


def _encode_flat(model, src, src_lengths):
    memory, mask, state = model.encode(src, src_lengths)
    return (memory, mask, *state)


class _Flat(nn.Module):
    """`forward(*tensors) = fn(model, *tensors)`: the exporter sees flat tensors in and out.

    The model is a registered submodule, so its weights become initializers and eval() reaches it.
    """

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def _export(module: _Flat, example: tuple, directory: Path, role: str, inputs: list[TensorSpec],
            outputs: list[TensorSpec], state_names: list[str], opset: int) -> Graph:
    path = Path(directory) / GRAPH_FILES[role]
    dynamic_axes = {t.name: {axis: dim for axis, dim in enumerate(t.shape) if not dim.isdigit()}
                    for t in (*inputs, *outputs)}
    # torch.onnx.export restores the mode it found, and a fresh wrapper starts in training mode,
    # which would switch the wrapped model's dropout on for everything that runs after the export.
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (it maps packed sequences to sequence_lens); its
        # batch-size warning is about initial states baked in as constants, here they are inputs; and
        # the tracer warnings come from nn.RNN's own argument checks. The graphs are run at other batch
        # and time sizes than the example's by the parity check, which is what would catch a frozen axis.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*with a batch_size other than 1.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset,
                          input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    proto = onnx.load(str(path))
    declare_interface(proto, inputs, outputs)
    proto.doc_string = f"seqserve {role} graph"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"{path.name}: the exported graph does not match its declared interface: {error}") \
            from error
    onnx.save(proto, str(path))
    return Graph(role=role, variant="fp32", file=path.name, inputs=inputs, outputs=outputs,
                 state_inputs=state_names, state_outputs=[output_name(n) for n in state_names])


def declare_interface(proto: onnx.ModelProto, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Make the graph's inputs and outputs exactly `inputs` and `outputs`, in that order.

    An input the computation never reads (input_feed without input feeding) is dropped by the
    exporter; it is put back, unused, so every graph of a kind has the same interface.
    """
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    extra = [i for i in graph.input if i.name in initializers]
    exported_outputs = {o.name for o in graph.output}
    missing = [t.name for t in outputs if t.name not in exported_outputs]
    if missing:
        raise ExportError(f"the exported graph lacks outputs {missing}")
    new_inputs = [_value_info(t) for t in inputs]
    new_outputs = [_value_info(t) for t in outputs]
    del graph.input[:]
    graph.input.extend(new_inputs + extra)
    del graph.output[:]
    graph.output.extend(new_outputs)
    # The exporter's guesses about intermediate shapes carry its misnamed axes; let ONNX infer afresh.
    del graph.value_info[:]


def _value_info(tensor: TensorSpec) -> onnx.ValueInfoProto:
    shape = [int(d) if d.isdigit() else d for d in tensor.shape]
    return helper.make_tensor_value_info(tensor.name, _ELEM_TYPES[tensor.dtype], shape)


def graph_interface(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX file as manifest TensorSpecs, read from the file itself."""
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [_tensor_spec(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [_tensor_spec(v) for v in proto.graph.output]


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims = [d.dim_param if d.dim_param else str(d.dim_value) for d in tensor_type.shape.dim]
    return TensorSpec(name=value.name, dtype=_DTYPE_NAMES.get(tensor_type.elem_type, "unknown"), shape=dims)


def op_type_counts(path: str | Path) -> Counter:
    """How many nodes of each op type the graph's main body has."""
    proto = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in proto.graph.node)


def check_recurrent_ops(path: str | Path, cell: str, layers: int) -> None:
    """Raise ExportError unless the recurrence is `layers` native ONNX ops of the cell's type, no loops.

    Native ops are what make a graph fast and let `sequence_lens` keep padding out of every row.
    """
    counts = op_type_counts(path)
    expected = ONNX_RECURRENT_OPS[cell]
    # int8 quantisation turns LSTM into com.microsoft DynamicQuantizeLSTM, still one fused op per layer.
    found = counts[expected] + counts[f"DynamicQuantize{expected}"]
    loops = {op: n for op, n in counts.items() if op in _LOOP_OPS}
    others = {op: n for op, n in counts.items() if op in ONNX_RECURRENT_OPS.values() and op != expected}
    if found != layers or loops or others:
        raise ExportError(
            f"{Path(path).name}: expected {layers} {expected} op(s) and no loops, found {found} {expected}"
            f"{', ' + str(loops) if loops else ''}{', ' + str(others) if others else ''}"
        )
