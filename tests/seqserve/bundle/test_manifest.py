"""Tests of seqserve/bundle/manifest.py: the schema's rules, JSON round trips, model names and versions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from seqserve.bundle import (
    ManifestError,
    parse_manifest,
    read_manifest,
    validate_name,
    validate_version,
    write_manifest,
)
from seqserve.v1.manifest_pb2 import Manifest

DIGEST = "0" * 64
STATE = ["batch", "2", "8"]

# A valid LM manifest as an exporter writes it, in proto3 JSON.
LM_MANIFEST = {
    "schema_version": 1,
    "name": "fortunes",
    "version": 3,
    "kind": "MODEL_KIND_LM",
    "cell": "lstm",
    "sizes": {"embedding_size": 8, "hidden_size": 8, "num_layers": 2, "vocab_size": 40},
    "special_tokens": {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3},
    "tokenizers": {"text": "tokenizer.json"},
    "graphs": [
        {
            "role": "step",
            "variant": "fp32",
            "file": "step.onnx",
            "inputs": [
                {"name": "tokens", "dtype": "int64", "shape": ["batch", "time"]},
                {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
                {"name": "h", "dtype": "float32", "shape": STATE},
                {"name": "c", "dtype": "float32", "shape": STATE},
            ],
            "outputs": [
                {"name": "log_probs", "dtype": "float32", "shape": ["batch", "time", "40"]},
                {"name": "h_out", "dtype": "float32", "shape": STATE},
                {"name": "c_out", "dtype": "float32", "shape": STATE},
            ],
            "state_inputs": ["h", "c"],
            "state_outputs": ["h_out", "c_out"],
        }
    ],
    "opset": 17,
    "parity": [{"variant": "fp32", "passed": True, "max_abs_diff_log_probs": 1e-6}],
    "metrics": {"perplexity": 12.5},
    "sha256": {"step.onnx": DIGEST, "tokenizer.json": DIGEST, "metrics.json": DIGEST},
    "created_at": "2025-01-02T03:04:05Z",
    "training": {"run_id": "abc"},
}


def _seq2seq_manifest() -> dict:
    document = copy.deepcopy(LM_MANIFEST)
    document.update(name="g2p-en", kind="MODEL_KIND_SEQ2SEQ", cell="gru")
    document["sizes"].update(
        source_vocab_size=30, encoder_hidden_size=8, encoder_layers=1, attention="general"
    )
    document["tokenizers"] = {"source": "source_tokenizer.json", "target": "target_tokenizer.json"}
    h = {"name": "h", "dtype": "float32", "shape": STATE}
    feed = {"name": "input_feed", "dtype": "float32", "shape": ["batch", "8"]}
    document["graphs"] = [
        {
            "role": "encoder",
            "variant": "fp32",
            "file": "encoder.onnx",
            "inputs": [{"name": "src", "dtype": "int64", "shape": ["batch", "src_time"]}],
            "outputs": [dict(h, name="h0"), dict(feed, name="input_feed0")],
            "state_outputs": ["h0", "input_feed0"],
        },
        {
            "role": "decoder_step",
            "variant": "fp32",
            "file": "decoder_step.onnx",
            "inputs": [{"name": "prev_token", "dtype": "int64", "shape": ["batch"]}, h, feed],
            "outputs": [dict(h, name="h_out"), dict(feed, name="input_feed_out")],
            "state_inputs": ["h", "input_feed"],
            "state_outputs": ["h_out", "input_feed_out"],
        },
    ]
    document["sha256"] = {
        name: DIGEST
        for name in ["encoder.onnx", "decoder_step.onnx", "source_tokenizer.json", "target_tokenizer.json"]
    }
    return document


def _parse(document: dict) -> Manifest:
    return parse_manifest(json.dumps(document))


def _violations(document: dict) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as caught:
        _parse(document)
    return caught.value.violations


def _fields(document: dict) -> list[str]:
    return [field for field, _ in _violations(document)]


def test_valid_manifests_parse() -> None:
    lm = _parse(LM_MANIFEST)
    assert (lm.name, lm.version, lm.cell, lm.sizes.num_layers) == ("fortunes", 3, "lstm", 2)
    assert lm.graphs[0].state_inputs == ["h", "c"]
    assert lm.created_at.seconds > 0
    assert _parse(_seq2seq_manifest()).sizes.attention == "general"


def test_write_then_read_round_trips_in_canonical_form(tmp_path: Path) -> None:
    manifest = _parse(LM_MANIFEST)
    path = tmp_path / "manifest.json"
    write_manifest(manifest, path)

    assert read_manifest(path) == manifest
    text = path.read_text()
    document = json.loads(text)
    assert list(document) == sorted(document)  # sorted keys
    assert "schema_version" in document and "schemaVersion" not in document  # proto field names
    assert text.endswith("}\n") and '\n  "cell"' in text
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left


def test_write_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    manifest = _parse(LM_MANIFEST)
    manifest.cell = "lstn"
    with pytest.raises(ManifestError, match="schema violation at field cell"):
        write_manifest(manifest, tmp_path / "manifest.json")
    assert not list(tmp_path.iterdir())


def test_unknown_fields_are_violations_naming_where() -> None:
    (field, problem), *_ = _violations(dict(LM_MANIFEST, colour="blue"))
    assert field == "colour" and 'no field named "colour"' in problem
    nested = copy.deepcopy(LM_MANIFEST)
    nested["sizes"]["hiden_size"] = 8
    field, problem = _violations(nested)[0]
    assert field == "sizes.hiden_size" and "hiden_size" in problem


def test_malformed_json_is_a_violation() -> None:
    with pytest.raises(ManifestError, match="schema violation"):
        parse_manifest("{not json")


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"schema_version": 0}, "schema_version", "missing"),
        ({"schema_version": 2}, "schema_version", "2 is not supported; this reader knows 1"),
        ({"kind": "MODEL_KIND_UNSPECIFIED"}, "kind", "must be one of"),
        ({"cell": "transformer"}, "cell", "'transformer' is not one of 'lstm', 'gru', 'rnn'"),
        ({"name": "../etc"}, "name", "not valid"),
        ({"version": 0}, "version", "must be a positive integer"),
        ({"opset": 0}, "opset", "positive ONNX opset"),
    ],
)
def test_top_level_rules(change: dict, field: str, problem: str) -> None:
    violations = dict(_violations(dict(LM_MANIFEST, **change)))
    assert problem in violations[field]


def test_lm_needs_its_step_graph() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    document["graphs"][0]["role"] = "encoder"
    violations = _violations(document)
    assert ("graphs[0].role", "'encoder' is not one of 'step', 'prefill' for this kind") in violations
    assert ("graphs", "variant 'fp32' has no 'step' graph") in violations


def _lm_prefill_graph(variant: str = "fp32", last: bool = True) -> dict:
    """The prefill graph beside LM_MANIFEST's step: step's inputs, its state outputs, then (`last`) the
    log-probs after each row's last token."""
    step = LM_MANIFEST["graphs"][0]
    suffix = "" if variant == "fp32" else f".{variant}"
    outputs = copy.deepcopy(step["outputs"][1:])
    if last:
        outputs.append({"name": "last_log_probs", "dtype": "float32", "shape": ["batch", "40"]})
    return dict(copy.deepcopy(step), role="prefill", variant=variant, file=f"prefill{suffix}.onnx", outputs=outputs)


def test_lm_prefill_graph_is_optional() -> None:
    parse_manifest(json.dumps(LM_MANIFEST))  # no prefill graph: valid, as bundles published before it
    document = copy.deepcopy(LM_MANIFEST)
    document["graphs"].append(_lm_prefill_graph())
    document["sha256"]["prefill.onnx"] = DIGEST
    parse_manifest(json.dumps(document))
    document["graphs"][1] = _lm_prefill_graph(last=False)  # state only, as exported before last_log_probs
    parse_manifest(json.dumps(document))
    # It may be present for some variants only; step stays required for every one.
    document["graphs"].append(_lm_prefill_graph("int8"))
    document["sha256"]["prefill.int8.onnx"] = DIGEST
    assert _violations(document) == [("graphs", "variant 'int8' has no 'step' graph")]


def test_lm_prefill_graph_carries_state() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    prefill = _lm_prefill_graph()
    prefill["state_outputs"] = ["h_out"]
    document["graphs"].append(prefill)
    document["sha256"]["prefill.onnx"] = DIGEST
    assert _violations(document) == [
        ("graphs[1].state_outputs", "1 state outputs for 2 state inputs"),
        ("graphs[1].outputs", "must be the 'fp32' step graph's state outputs, then optionally last_log_probs"),
    ]


def test_lm_prefill_graph_must_match_step() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    prefill = _lm_prefill_graph()
    prefill["inputs"][0]["name"] = "ids"
    prefill["outputs"] = copy.deepcopy(LM_MANIFEST["graphs"][0]["outputs"])  # log_probs too
    document["graphs"].append(prefill)
    document["sha256"]["prefill.onnx"] = DIGEST
    assert _violations(document) == [
        ("graphs[1].inputs", "differ from the 'fp32' step graph's"),
        ("graphs[1].outputs", "must be the 'fp32' step graph's state outputs, then optionally last_log_probs"),
    ]


def test_lm_prefill_graph_last_log_probs_are_one_row_of_step_log_probs() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    prefill = _lm_prefill_graph()
    prefill["outputs"][-1]["shape"] = ["batch", "time", "40"]  # every position's: that is step's job
    document["graphs"].append(prefill)
    document["sha256"]["prefill.onnx"] = DIGEST
    assert _violations(document) == [
        ("graphs[1].outputs[2]", "after the state outputs a prefill graph has only last_log_probs "
                                 "float32[batch, vocab], the step's last log-probs"),
    ]


def test_seq2seq_has_no_prefill_graph() -> None:
    document = _seq2seq_manifest()
    document["graphs"].append(dict(copy.deepcopy(document["graphs"][1]), role="prefill", file="prefill.onnx"))
    document["sha256"]["prefill.onnx"] = DIGEST
    assert _violations(document) == [
        ("graphs[2].role", "'prefill' is not one of 'encoder', 'decoder_step' for this kind")]


def test_every_variant_needs_every_role() -> None:
    document = _seq2seq_manifest()
    document["graphs"].append(dict(document["graphs"][0], variant="int8", file="encoder.int8.onnx"))
    document["sha256"]["encoder.int8.onnx"] = DIGEST
    assert _violations(document) == [("graphs", "variant 'int8' has no 'decoder_step' graph")]


def test_tokenizers_must_match_the_kind() -> None:
    document = _seq2seq_manifest()
    document["tokenizers"] = {"source": "source_tokenizer.json", "text": "target_tokenizer.json"}
    assert set(_fields(document)) == {'tokenizers["target"]', 'tokenizers["text"]'}


def test_every_file_needs_a_checksum() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    del document["sha256"]["tokenizer.json"]
    document["sha256"]["metrics.json"] = "ABC"
    assert _violations(document) == [
        ("sha256", "no checksum for 'tokenizer.json'"),
        ('sha256["metrics.json"]', "'ABC' is not 64 lowercase hex digits"),
    ]


@pytest.mark.parametrize(
    "file_name", ["../step.onnx", "/tmp/step.onnx", "sub/step.onnx", ".hidden", "manifest.json"]
)
def test_files_are_plain_names_inside_the_bundle(file_name: str) -> None:
    document = copy.deepcopy(LM_MANIFEST)
    document["graphs"][0]["file"] = file_name
    document["sha256"][file_name] = DIGEST
    assert "graphs[0].file" in _fields(document)


def test_graph_interface_rules() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    graph = document["graphs"][0]
    graph["inputs"][0]["dtype"] = "long"
    graph["inputs"][1]["shape"] = ["-1"]
    graph["state_inputs"] = ["h", "cell"]
    violations = dict(_violations(document))
    assert "'long' is not one of" in violations["graphs[0].inputs[0].dtype"]
    assert "neither a positive integer nor a symbolic name" in violations["graphs[0].inputs[1].shape[0]"]
    assert violations["graphs[0].state_inputs[1]"] == "'cell' is not an input of the graph"


def test_state_outputs_match_their_inputs() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    document["graphs"][0]["outputs"][2]["dtype"] = "float16"
    violations = dict(_violations(document))
    assert "'c_out' (float16 [batch, 2, 8]) does not match 'c'" in violations["graphs[0].state_outputs[1]"]


def test_state_counts_must_agree() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    document["graphs"][0]["state_outputs"] = ["h_out"]
    assert _violations(document) == [("graphs[0].state_outputs", "1 state outputs for 2 state inputs")]


def test_special_tokens_are_distinct_and_in_the_vocabulary() -> None:
    document = copy.deepcopy(LM_MANIFEST)
    document["special_tokens"] = {"pad_id": 0, "bos_id": 1, "eos_id": 1, "unk_id": 40}
    violations = dict(_violations(document))
    assert violations["special_tokens.unk_id"] == "40 is outside the vocabulary [0, 40)"
    assert violations["special_tokens"] == "'bos_id', 'eos_id' share the id 1"


def test_all_violations_are_reported_at_once() -> None:
    message = str(_violations_error(dict(LM_MANIFEST, cell="x", opset=0, version=-1)))
    assert message.count("schema violation at field") == 3


def _violations_error(document: dict) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        _parse(document)
    return caught.value


@pytest.mark.parametrize("name", ["g2p-en", "fortunes.lm", "a", "0", "de-en_v2"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["..", "a/b", "Upper", "-x", "", ".hidden", "a..b", "/abs", "a\\b", "x" * 129, "é"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        validate_name(name)


@pytest.mark.parametrize(("version", "expected"), [(1, 1), ("1", 1), ("12", 12), (2**31 - 1, 2**31 - 1)])
def test_valid_versions(version, expected: int) -> None:
    assert validate_version(version) == expected


@pytest.mark.parametrize("version", [0, -1, "0", "01", "1.0", "x", "", " 1", "١", True, 2**31, 1.0])
def test_invalid_versions(version) -> None:
    with pytest.raises(ValueError, match="model version"):
        validate_version(version)
