"""Tests of server/bundle/loader.py on tiny bundles built here: valid ones load, broken ones say why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from seqserve.bundle import BundleError, read_manifest, sha256_file, verify_bundle, write_manifest  # noqa: E402
from seqserve.v1.manifest_pb2 import Graph, Manifest, ModelKind, ParityReport, TensorSpec  # noqa: E402
from server.bundle import load_bundle  # noqa: E402

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"]
LAYERS, HIDDEN = 1, 4
CPU = "CPUExecutionProvider"
# Two CPU cores are shared by everyone running tests: one thread per session.
ONE_THREAD = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


def _spec(name: str, dtype: str, *shape: str) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=list(shape))


def _value_infos(specs: list[TensorSpec]):
    return [
        helper.make_tensor_value_info(
            spec.name, _ONNX_TYPES[spec.dtype], [int(d) if d.isdigit() else d for d in spec.shape]
        )
        for spec in specs
    ]


def _interfaces(kind: ModelKind.ValueType) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    """(inputs, outputs) by graph role, as the manifest lists them and the graphs declare them."""
    layers, hidden, vocab = str(LAYERS), str(HIDDEN), str(len(VOCAB))
    state = ("batch", layers, hidden)
    if kind == ModelKind.MODEL_KIND_LM:
        return {
            "step": (
                [
                    _spec("tokens", "int64", "batch", "time"),
                    _spec("lengths", "int64", "batch"),
                    _spec("h", "float32", *state),
                ],
                [_spec("log_probs", "float32", "batch", "time", vocab), _spec("h_out", "float32", *state)],
            )
        }
    return {
        "encoder": (
            [_spec("src", "int64", "batch", "src_time"), _spec("src_lengths", "int64", "batch")],
            [
                _spec("memory", "float32", "batch", "src_time", hidden),
                _spec("mask", "float32", "batch", "src_time"),
                _spec("h0", "float32", *state),
                _spec("input_feed0", "float32", "batch", hidden),
            ],
        ),
        "decoder_step": (
            [
                _spec("prev_token", "int64", "batch"),
                _spec("h", "float32", *state),
                _spec("input_feed", "float32", "batch", hidden),
                _spec("memory", "float32", "batch", "src_time", hidden),
                _spec("mask", "float32", "batch", "src_time"),
            ],
            [
                _spec("log_probs", "float32", "batch", vocab),
                _spec("h_out", "float32", *state),
                _spec("input_feed_out", "float32", "batch", hidden),
                _spec("attention", "float32", "batch", "src_time"),
            ],
        ),
    }


STATE_NAMES = {
    "step": (["h"], ["h_out"]),
    "encoder": ([], ["h0", "input_feed0"]),
    "decoder_step": (["h", "input_feed"], ["h_out", "input_feed_out"]),
}


def _nodes(role: str):
    """Trivial computations with the right dtypes and ranks: enough for ONNX Runtime to load and run."""
    if role == "step":
        return [
            helper.make_node("Gather", ["table", "tokens"], ["scores"]),
            helper.make_node("LogSoftmax", ["scores"], ["log_probs"], axis=-1),
            helper.make_node("Identity", ["h"], ["h_out"]),
        ], [helper.make_tensor("table", TensorProto.FLOAT, [len(VOCAB), len(VOCAB)], [0.0] * len(VOCAB) ** 2)]
    if role == "encoder":
        return [
            helper.make_node("Gather", ["embedding", "src"], ["memory"]),
            helper.make_node("Equal", ["src", "pad"], ["is_pad"]),
            helper.make_node("Not", ["is_pad"], ["is_token"]),
            helper.make_node("Cast", ["is_token"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["memory"], ["h0"], axes=[1], keepdims=1),
            helper.make_node("ReduceMean", ["memory"], ["input_feed0"], axes=[1], keepdims=0),
        ], [
            helper.make_tensor(
                "embedding", TensorProto.FLOAT, [len(VOCAB), HIDDEN], [0.5] * len(VOCAB) * HIDDEN
            ),
            helper.make_tensor("pad", TensorProto.INT64, [], [0]),
        ]
    return [
        helper.make_node("Gather", ["table", "prev_token"], ["scores"]),
        helper.make_node("LogSoftmax", ["scores"], ["log_probs"], axis=-1),
        helper.make_node("Identity", ["h"], ["h_out"]),
        helper.make_node("Identity", ["input_feed"], ["input_feed_out"]),
        helper.make_node("Softmax", ["mask"], ["attention"], axis=-1),
    ], [helper.make_tensor("table", TensorProto.FLOAT, [len(VOCAB), len(VOCAB)], [0.0] * len(VOCAB) ** 2)]


def _write_graph(path: Path, role: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    nodes, initializers = _nodes(role)
    graph = helper.make_graph(nodes, role, _value_infos(inputs), _value_infos(outputs), initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write_tokenizer(path: Path) -> None:
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def build_bundle(directory: Path, kind: ModelKind.ValueType = ModelKind.MODEL_KIND_LM) -> Path:
    """Write a complete, valid bundle of `kind` into `directory` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    is_lm = kind == ModelKind.MODEL_KIND_LM
    manifest = Manifest(
        schema_version=1,
        name="tiny-lm" if is_lm else "tiny-g2p",
        version=1,
        kind=kind,
        cell="gru",
        opset=17,
        onnxruntime_version=ort.__version__,
    )
    manifest.sizes.embedding_size = HIDDEN
    manifest.sizes.hidden_size = HIDDEN
    manifest.sizes.num_layers = LAYERS
    manifest.sizes.vocab_size = len(VOCAB)
    if not is_lm:
        manifest.sizes.source_vocab_size = len(VOCAB)
        manifest.sizes.encoder_hidden_size = HIDDEN
        manifest.sizes.encoder_layers = LAYERS
        manifest.sizes.attention = "dot"
        manifest.sizes.input_feeding = True
    manifest.special_tokens.pad_id, manifest.special_tokens.bos_id = 0, 1
    manifest.special_tokens.eos_id, manifest.special_tokens.unk_id = 2, 3
    roles = ["text"] if is_lm else ["source", "target"]
    for role in roles:
        file_name = "tokenizer.json" if is_lm else f"{role}_tokenizer.json"
        _write_tokenizer(directory / file_name)
        manifest.tokenizers[role] = file_name
    for role, (inputs, outputs) in _interfaces(kind).items():
        _write_graph(directory / f"{role}.onnx", role, inputs, outputs)
        state_inputs, state_outputs = STATE_NAMES[role]
        manifest.graphs.append(
            Graph(
                role=role,
                variant="fp32",
                file=f"{role}.onnx",
                inputs=inputs,
                outputs=outputs,
                state_inputs=state_inputs,
                state_outputs=state_outputs,
            )
        )
    manifest.parity.append(
        ParityReport(variant="fp32", passed=True, providers=[CPU], greedy_checked=1, greedy_matched=1)
    )
    _write_with_checksums(directory, manifest)
    return directory


def _write_with_checksums(directory: Path, manifest: Manifest) -> None:
    manifest.sha256.clear()
    for path in sorted(directory.iterdir()):
        if path.name != "manifest.json":
            manifest.sha256[path.name] = sha256_file(path)
    write_manifest(manifest, directory / "manifest.json")


def _edit_manifest_json(directory: Path, edit) -> None:
    """Apply `edit` to the manifest as plain JSON, bypassing the schema, as a careless tool would."""
    path = directory / "manifest.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


@pytest.fixture()
def lm_bundle(tmp_path: Path) -> Path:
    return build_bundle(tmp_path / "tiny-lm" / "1")


@pytest.fixture()
def seq2seq_bundle(tmp_path: Path) -> Path:
    return build_bundle(tmp_path / "tiny-g2p" / "1", ModelKind.MODEL_KIND_SEQ2SEQ)


def test_lm_bundle_loads_and_runs(lm_bundle: Path) -> None:
    bundle = load_bundle(lm_bundle, [CPU], ONE_THREAD, expected_name="tiny-lm", expected_version=1)

    assert (bundle.name, bundle.version, bundle.variant) == ("tiny-lm", 1, "fp32")
    assert set(bundle.graphs) == {"step"} and set(bundle.tokenizers) == {"text"}
    assert bundle.providers == (CPU,) and bundle.requested_providers == (CPU,)
    step = bundle.graph("step")
    assert step.state_inputs == ("h",) and step.state_outputs == ("h_out",)
    tokens = np.array([bundle.tokenizer("text").encode("a b c").ids], dtype=np.int64)
    log_probs, h_out = step.session.run(
        list(step.output_names),
        {"tokens": tokens, "lengths": np.array([3]), "h": np.ones((1, LAYERS, HIDDEN), np.float32)},
    )
    assert log_probs.shape == (1, 3, len(VOCAB)) and h_out.shape == (1, LAYERS, HIDDEN)


def test_seq2seq_bundle_loads(seq2seq_bundle: Path) -> None:
    bundle = load_bundle(seq2seq_bundle, [CPU], ONE_THREAD)

    assert set(bundle.graphs) == {"encoder", "decoder_step"}
    assert set(bundle.tokenizers) == {"source", "target"}
    assert bundle.graph("decoder_step").state_inputs == ("h", "input_feed")
    with pytest.raises(BundleError, match="no 'step' graph"):
        bundle.graph("step")


def test_missing_file_is_named(lm_bundle: Path) -> None:
    (lm_bundle / "step.onnx").unlink()
    with pytest.raises(BundleError, match="missing file step.onnx"):
        verify_bundle(lm_bundle)


def test_missing_manifest_is_named(lm_bundle: Path) -> None:
    (lm_bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="missing file manifest.json"):
        load_bundle(lm_bundle)


def test_missing_bundle_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "nowhere")


def test_checksum_mismatch_names_file_and_both_digests(lm_bundle: Path) -> None:
    expected = sha256_file(lm_bundle / "tokenizer.json")
    with open(lm_bundle / "tokenizer.json", "a") as handle:
        handle.write(" ")
    actual = sha256_file(lm_bundle / "tokenizer.json")

    with pytest.raises(BundleError) as caught:
        load_bundle(lm_bundle)
    assert f"checksum mismatch for tokenizer.json: expected {expected}, got {actual}" in str(caught.value)


def test_unknown_manifest_field_is_a_schema_violation(lm_bundle: Path) -> None:
    _edit_manifest_json(lm_bundle, lambda document: document.update(colour="blue"))
    with pytest.raises(BundleError, match=r"schema violation at field .*colour"):
        verify_bundle(lm_bundle)


def test_bad_cell_is_a_schema_violation(lm_bundle: Path) -> None:
    _edit_manifest_json(lm_bundle, lambda document: document.update(cell="transformer"))
    with pytest.raises(BundleError, match=r"schema violation at field cell: 'transformer' is not one of"):
        verify_bundle(lm_bundle)


def test_missing_graph_is_a_schema_violation(seq2seq_bundle: Path) -> None:
    def drop_decoder(document: dict) -> None:
        document["graphs"] = [graph for graph in document["graphs"] if graph["role"] != "decoder_step"]

    _edit_manifest_json(seq2seq_bundle, drop_decoder)
    with pytest.raises(
        BundleError, match=r"schema violation at field graphs: variant 'fp32' has no 'decoder_step'"
    ):
        verify_bundle(seq2seq_bundle)


def test_name_or_version_differing_from_directory_is_refused(lm_bundle: Path) -> None:
    with pytest.raises(BundleError, match="names the model 'tiny-lm', its directory 'other'"):
        verify_bundle(lm_bundle, expected_name="other")
    with pytest.raises(BundleError, match="says version 1, its directory 2"):
        verify_bundle(lm_bundle, expected_version=2)


def _change_manifest(directory: Path, change) -> None:
    manifest = read_manifest(directory / "manifest.json")
    change(manifest)
    write_manifest(manifest, directory / "manifest.json")


def _step_spec(manifest: Manifest) -> Graph:
    return next(graph for graph in manifest.graphs if graph.role == "step")


def test_input_missing_from_graph_is_an_io_mismatch(lm_bundle: Path) -> None:
    def rename_state(manifest: Manifest) -> None:
        step = _step_spec(manifest)
        step.inputs[2].name = "hidden"
        step.state_inputs[0] = "hidden"

    _change_manifest(lm_bundle, rename_state)
    with pytest.raises(BundleError) as caught:
        load_bundle(lm_bundle, [CPU], ONE_THREAD)
    message = str(caught.value)
    assert "graph I/O mismatch" in message
    assert "graph step.onnx has no input 'hidden' that the manifest lists" in message
    assert "graph step.onnx has input 'h' that the manifest does not list" in message


def test_dtype_difference_is_an_io_mismatch(lm_bundle: Path) -> None:
    _change_manifest(lm_bundle, lambda manifest: setattr(_step_spec(manifest).inputs[0], "dtype", "int32"))
    with pytest.raises(
        BundleError, match="graph step.onnx input 'tokens' has dtype int64, the manifest says int32"
    ):
        load_bundle(lm_bundle, [CPU], ONE_THREAD)


def test_rank_difference_is_an_io_mismatch(lm_bundle: Path) -> None:
    _change_manifest(lm_bundle, lambda manifest: _step_spec(manifest).outputs[0].shape.pop())
    with pytest.raises(
        BundleError, match="graph step.onnx output 'log_probs' has rank 3, the manifest says 2"
    ):
        load_bundle(lm_bundle, [CPU], ONE_THREAD)


def test_frozen_dynamic_axis_is_an_io_mismatch(lm_bundle: Path) -> None:
    # What an exporter produces when an output's time axis is frozen to the example's length.
    inputs, outputs = _interfaces(ModelKind.MODEL_KIND_LM)["step"]
    frozen = [_spec("log_probs", "float32", "batch", "5", str(len(VOCAB))), outputs[1]]
    _write_graph(lm_bundle / "step.onnx", "step", inputs, frozen)
    _change_manifest(
        lm_bundle,
        lambda manifest: manifest.sha256.update({"step.onnx": sha256_file(lm_bundle / "step.onnx")}),
    )

    with pytest.raises(
        BundleError, match="output 'log_probs' fixes axis 1 to 5, the manifest has dynamic 'time'"
    ):
        load_bundle(lm_bundle, [CPU], ONE_THREAD)


def test_graph_onnx_runtime_cannot_open_is_named(lm_bundle: Path) -> None:
    (lm_bundle / "step.onnx").write_bytes(b"not a model")
    _change_manifest(
        lm_bundle,
        lambda manifest: manifest.sha256.update({"step.onnx": sha256_file(lm_bundle / "step.onnx")}),
    )
    with pytest.raises(BundleError, match="ONNX Runtime cannot open step.onnx"):
        load_bundle(lm_bundle, [CPU], ONE_THREAD)


def test_tokenizer_special_ids_must_match_the_manifest(lm_bundle: Path) -> None:
    def swap(manifest: Manifest) -> None:
        manifest.special_tokens.eos_id, manifest.special_tokens.unk_id = 3, 2

    _change_manifest(lm_bundle, swap)
    with pytest.raises(
        BundleError, match=r"tokenizer tokenizer.json \(text\) has <eos> at id 2, .*eos_id is 3"
    ):
        load_bundle(lm_bundle, [CPU], ONE_THREAD)


def test_failed_parity_is_refused_unless_allowed(lm_bundle: Path) -> None:
    _change_manifest(lm_bundle, lambda manifest: setattr(manifest.parity[0], "passed", False))
    with pytest.raises(BundleError, match="the fp32 graphs failed their parity check"):
        load_bundle(lm_bundle, [CPU], ONE_THREAD)
    assert load_bundle(lm_bundle, [CPU], ONE_THREAD, allow_failed_parity=True).variant == "fp32"


def test_absent_variant_is_named(lm_bundle: Path) -> None:
    with pytest.raises(BundleError, match="has no 'int8' graphs; it has fp32"):
        load_bundle(lm_bundle, [CPU], ONE_THREAD, variant="int8")


def test_obtained_providers_are_read_back_from_the_sessions(lm_bundle: Path) -> None:
    # The GPU build lists CUDA even on machines where it cannot start, so only get_providers() tells.
    bundle = load_bundle(lm_bundle, ["CUDAExecutionProvider", CPU], {**ONE_THREAD, "log_severity_level": 4})
    assert bundle.requested_providers == ("CUDAExecutionProvider", CPU)
    assert bundle.providers[-1] == CPU
    assert set(bundle.providers) <= {"CUDAExecutionProvider", CPU}
    assert bundle.providers == bundle.graph("step").providers
