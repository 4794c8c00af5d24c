"""proto/inference/*.proto is wire-compatible with the published Open Inference Protocol, as the installed
tritonclient describes it: every service method, message, field and enum value we declare has the
protocol's name, number, type and cardinality. Every element is commented."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

import seqserve.inference as oip

grpc_tools = pytest.importorskip("grpc_tools")
triton_service = pytest.importorskip("tritonclient.grpc.service_pb2")
from grpc_tools import protoc  # noqa: E402
from tritonclient.grpc import model_config_pb2 as triton_config  # noqa: E402

from tests.proto.test_stubs_fresh import _CommentAudit  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto" / "inference"


def _triton_message(full_name: str):
    for module in (triton_service, triton_config):
        try:
            return module.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
    raise AssertionError(f"{full_name} is not a message of the published protocol")


def _field_facts(field: FieldDescriptor) -> tuple:
    type_name = field.message_type.full_name if field.message_type else (
        field.enum_type.full_name if field.enum_type else "")
    return field.name, field.number, field.type, field.is_repeated, type_name


def _messages(descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _messages(nested)


def test_the_service_is_the_protocols():
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert oip.SERVICE.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in oip.SERVICE.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                method.server_streaming) == (other.input_type.full_name, other.output_type.full_name,
                                             other.client_streaming, other.server_streaming), method.name
    assert len(oip.SERVICE.methods) == 10


def test_every_message_and_field_matches_the_published_protocol():
    pool = oip.SERVICE.file.pool
    checked = 0
    for file_name in ("inference/service.proto", "inference/model_config.proto"):
        for top in pool.FindFileByName(file_name).message_types_by_name.values():
            for message in _messages(top):
                theirs = _triton_message(message.full_name)
                for field in message.fields:
                    assert field.name in theirs.fields_by_name, f"{message.full_name}.{field.name} is not theirs"
                    assert _field_facts(field) == _field_facts(theirs.fields_by_name[field.name]), \
                        f"{message.full_name}.{field.name}"
                    checked += 1
                for oneof in message.oneofs:
                    assert oneof.name in theirs.oneofs_by_name, f"{message.full_name} oneof {oneof.name}"
    assert checked > 80


def test_enum_values_match():
    ours = oip.SERVICE.file.pool.FindEnumTypeByName("inference.DataType")
    theirs = triton_config.DESCRIPTOR.enum_types_by_name["DataType"]
    assert [(v.name, v.number) for v in ours.values] == [(v.name, v.number) for v in theirs.values]


def test_every_rpc_message_field_and_enum_value_is_commented(tmp_path):
    out = tmp_path / "descriptors.pb"
    assert protoc.main(["protoc", f"-I{REPO / 'proto'}", "--include_source_info", f"--descriptor_set_out={out}",
                        *sorted(str(path) for path in PROTO_DIR.glob("*.proto"))]) == 0
    problems = []
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        assert file.package == "inference" and file.name.startswith("inference/")
        problems += _CommentAudit(file).run()
    assert not problems, "\n".join(problems)
