"""Tests of seqserve/bundle/spec.py: the typed ModelSpec read once from a manifest."""

from __future__ import annotations

import copy
import json

import pytest
from test_manifest import LM_MANIFEST, _seq2seq_manifest  # the same manifests the schema tests use

from seqserve.bundle import BundleError, parse_manifest
from seqserve.bundle.spec import ModelKind, ModelSpec
from seqserve.v1.manifest_pb2 import ModelKind as PbModelKind


def _spec(document: dict, variant: str = "fp32") -> ModelSpec:
    return ModelSpec.from_manifest(parse_manifest(json.dumps(document)), variant)


def test_lm_spec_has_kind_ids_sizes_and_state_from_the_step_graph() -> None:
    spec = _spec(LM_MANIFEST)
    assert (spec.name, spec.version, spec.kind, spec.cell) == ("fortunes", 3, ModelKind.LM, "lstm")
    assert spec.variant == "fp32"
    assert spec.kind == "lm" and str(spec.kind) == "lm" and spec.is_lm
    assert (spec.special.pad, spec.special.bos, spec.special.eos, spec.special.unk) == (0, 1, 2, 3)
    assert (spec.vocab_size, spec.source_vocab_size, spec.memory_size) == (40, 0, None)
    assert spec.state_role == "step" and spec.state_names == ("h", "c")
    assert spec.state_shapes == ((2, 8), (2, 8))
    assert spec.tokenizer_roles == ("text",) and spec.output_tokenizer_role == "text"
    step = spec.graph("step")
    assert step.input_names == ("tokens", "lengths", "h", "c") and step.output_names[0] == "log_probs"
    assert step.input("tokens").shape == ("batch", "time") and step.input("h").fixed_shape == (2, 8)
    with pytest.raises(BundleError, match="no 'prefill' graph"):
        spec.graph("prefill")


def test_seq2seq_spec_reads_state_and_memory_from_the_decoder_step() -> None:
    document = _seq2seq_manifest()
    decoder = next(g for g in document["graphs"] if g["role"] == "decoder_step")
    decoder["inputs"].append({"name": "memory", "dtype": "float32", "shape": ["batch", "src_time", "16"]})
    spec = _spec(document)
    assert spec.kind is ModelKind.SEQ2SEQ and not spec.is_lm
    assert (spec.vocab_size, spec.source_vocab_size, spec.memory_size) == (40, 30, 16)
    assert spec.state_role == "decoder_step" and spec.state_names == ("h", "input_feed")
    assert spec.state_shapes == ((2, 8), (8,))
    assert spec.tokenizer_roles == ("source", "target") and spec.output_tokenizer_role == "target"


def test_kind_maps_to_the_wire_enum_both_ways() -> None:
    for kind in ModelKind:
        assert ModelKind.from_pb(kind.to_pb()) is kind
    assert ModelKind.LM.to_pb() == PbModelKind.MODEL_KIND_LM
    with pytest.raises(BundleError, match="unknown model kind"):
        ModelKind.from_pb(PbModelKind.MODEL_KIND_UNSPECIFIED)


def test_identity_depends_on_every_checksum_and_nothing_else() -> None:
    first = _spec(LM_MANIFEST)
    other_metrics = copy.deepcopy(LM_MANIFEST)
    other_metrics["metrics"] = {"perplexity": 99.0}
    assert _spec(other_metrics).identity == first.identity and len(first.identity) == 16
    changed = copy.deepcopy(LM_MANIFEST)
    changed["sha256"]["step.onnx"] = "1" * 64
    assert _spec(changed).identity != first.identity
