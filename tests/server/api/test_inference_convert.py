"""Triton's BYTES encoding and the request parameters of the Open Inference Protocol, alone."""

from __future__ import annotations

import struct

import pytest

import seqserve.inference as oip
from server.api import inference_convert as convert
from server.decoding.limits import RequestLimits
from server.errors import InvalidArgument


def _parameters(**values) -> dict:
    request = oip.ModelInferRequest()
    for name, value in values.items():
        convert.set_parameter(request, name, value)
    return request.parameters


def test_bytes_round_trip_including_empty_and_multibyte_elements():
    texts = ["hello", "", "größe ✓"]
    raw = convert.encode_bytes(texts)
    assert raw[:4] == struct.pack("<I", 5)
    assert [item.decode() for item in convert.decode_bytes(raw, "raw")] == texts


@pytest.mark.parametrize("raw", [b"\x05\x00", b"\x05\x00\x00\x00abc"])
def test_truncated_bytes_name_where(raw):
    with pytest.raises(InvalidArgument) as caught:
        convert.decode_bytes(raw, "raw_input_contents[0]")
    assert caught.value.field == "raw_input_contents[0]"


def test_parameters_become_decoding_options_validated_by_the_native_code():
    parsed = convert.parameters_from_pb(_parameters(strategy="sample", top_k=40, top_p=0.9, seed=3,
                                                    temperature="0.7", stop='["\\n", "."]', priority=1))
    params = parsed.decoding_params(RequestLimits(), single_result=True)
    assert (params.strategy, params.top_k, params.top_p, params.seed, params.temperature) == ("sample", 40, 0.9, 3, 0.7)
    assert params.stop == ("\n", ".") and parsed.sequence is None
    with pytest.raises(InvalidArgument, match=r"parameters\.top_p must be in \(0, 1\], got 1.5"):
        convert.parameters_from_pb(_parameters(strategy="sample", top_p=1.5)).decoding_params(
            RequestLimits(), single_result=True)


@pytest.mark.parametrize(("values", "field"), [
    ({"top_k": 2.5}, "parameters.top_k"),
    ({"max_new_tokens": 2**40}, "parameters.max_new_tokens"),
    ({"seed": -1}, "parameters.seed"),
    ({"early_stopping": "yes"}, "parameters.early_stopping"),
    ({"stop": '["unclosed'}, "parameters.stop"),
    ({"strategy": 3}, "parameters.strategy"),
    ({"beams": 4}, "parameters.beams"),
    ({"sequence_end": True}, "parameters.sequence_id"),
])
def test_bad_parameters_name_the_field(values, field):
    with pytest.raises(InvalidArgument) as caught:
        convert.parameters_from_pb(_parameters(**values))
    assert caught.value.field == field


def test_sequence_controls_with_integer_and_string_ids():
    parsed = convert.parameters_from_pb(_parameters(sequence_id=9, sequence_start=True))
    assert parsed.sequence == convert.SequenceControl(9, start=True, end=False)
    parsed = convert.parameters_from_pb(_parameters(sequence_id="chat-1", sequence_end=True))
    assert parsed.sequence == convert.SequenceControl("chat-1", start=False, end=True)
    assert convert.parameters_from_pb(_parameters(sequence_id=0)).sequence is None  # Triton: 0 = none
    assert convert.parameters_from_pb(_parameters(triton_enable_empty_final_response=True)).given == set()
