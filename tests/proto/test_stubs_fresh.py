"""The committed seqserve/v1 stubs and inference descriptor set are what proto/generate.sh makes, and the
protos follow the style rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools")
from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_tools import protoc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto" / "seqserve" / "v1"
STUBS_DIR = REPO / "seqserve" / "v1"
INFERENCE_SET = Path("seqserve") / "inference" / "inference.binpb"
STREAMING_WORDS = ("Unary.", "Server streaming", "Bidirectional streaming")


def _stubs(directory: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(directory.glob("*_pb2*")) if path.is_file()}


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "proto" / "generate.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr

    generated, committed = _stubs(tmp_path / "seqserve" / "v1"), _stubs(STUBS_DIR)
    advice = "run proto/generate.sh (with grpcio-tools as pinned in pyproject.toml) and commit the result"
    assert sorted(generated) == sorted(committed), f"stub files differ; {advice}"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale stubs {stale}; {advice}"
    assert (tmp_path / INFERENCE_SET).read_bytes() == (REPO / INFERENCE_SET).read_bytes(), \
        f"stale {INFERENCE_SET}; {advice}"


def _descriptors(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    include_well_known = Path(grpc_tools.__file__).parent / "_proto"
    import google.rpc.status_pb2 as status_pb2

    include_googleapis = Path(status_pb2.__file__).parents[2]
    out = tmp_path / "descriptors.pb"
    arguments = [
        "protoc",
        f"-I{REPO / 'proto'}",
        f"-I{include_well_known}",
        f"-I{include_googleapis}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *sorted(str(path) for path in PROTO_DIR.glob("*.proto")),
    ]
    assert protoc.main(arguments) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class _CommentAudit:
    """Walks one .proto file's descriptor and lists every element without a leading comment.

    Source locations are paths of descriptor field numbers: 4 = message_type, 5 = enum_type,
    6 = service in a file; 2 = field, 3 = nested_type, 4 = enum_type, 8 = oneof_decl in a message;
    2 = value in an enum; 2 = method in a service.
    """

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self.file = file
        self.comments = {
            tuple(location.path): location.leading_comments for location in file.source_code_info.location
        }
        self.problems: list[str] = []

    def run(self) -> list[str]:
        for index, message in enumerate(self.file.message_type):
            self._message((4, index), message, "")
        for index, enum in enumerate(self.file.enum_type):
            self._enum((5, index), enum, "")
        for service_index, service in enumerate(self.file.service):
            self._check((6, service_index), f"service {service.name}")
            for index, method in enumerate(service.method):
                path = (6, service_index, 2, index)
                self._check(path, f"rpc {method.name}")
                comment = " ".join(self.comments.get(path, "").split())  # words may wrap across lines
                if not any(word in comment for word in STREAMING_WORDS):
                    self.problems.append(
                        f"{self.file.name}: rpc {method.name} does not say whether it streams"
                    )
        return self.problems

    def _check(self, path: tuple[int, ...], what: str) -> None:
        if not self.comments.get(path, "").strip():
            self.problems.append(f"{self.file.name}: {what} has no comment")

    def _message(self, path: tuple[int, ...], message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}{message.name}"
        self._check(path, f"message {name}")
        for index, field in enumerate(message.field):
            self._check((*path, 2, index), f"field {name}.{field.name}")
        for index, oneof in enumerate(message.oneof_decl):
            if not oneof.name.startswith("_"):  # proto3 `optional` makes synthetic oneofs
                self._check((*path, 8, index), f"oneof {name}.{oneof.name}")
        for index, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:
                self._message((*path, 3, index), nested, f"{name}.")
        for index, enum in enumerate(message.enum_type):
            self._enum((*path, 4, index), enum, f"{name}.")

    def _enum(self, path: tuple[int, ...], enum: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        self._check(path, f"enum {prefix}{enum.name}")
        for index, value in enumerate(enum.value):
            self._check((*path, 2, index), f"enum value {value.name}")


def test_every_rpc_message_field_and_enum_value_is_commented(tmp_path: Path) -> None:
    problems = []
    for file in _descriptors(tmp_path).file:
        assert file.package == "seqserve.v1" and file.name.startswith("seqserve/v1/")
        problems += _CommentAudit(file).run()
    assert not problems, "\n".join(problems)


def test_enum_values_carry_their_prefix_and_zero_is_unspecified(tmp_path: Path) -> None:
    def enums(file):
        yield from file.enum_type
        for message in file.message_type:
            yield from message.enum_type

    for file in _descriptors(tmp_path).file:
        for enum in enums(file):
            prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
            assert enum.value[0].number == 0 and enum.value[0].name == f"{prefix}UNSPECIFIED", enum.name
            assert all(value.name.startswith(prefix) for value in enum.value), enum.name
