"""The Open Inference Protocol (KServe v2 / Triton gRPC) messages seqserve serves, built in a private pool.

`proto/generate.sh` compiles `proto/inference/*.proto` into `inference.binpb` beside this file. The classes
live in a descriptor pool of their own rather than protobuf's default one, where tritonclient registers
its own `inference` package: both can be imported in one process (a test, or a program that serves and
calls). The wire format is all the two share.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE_NAME = f"{PACKAGE}.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(
        (Path(__file__).parent / "inference.binpb").read_bytes()).file:
    _pool.Add(_file)

SERVICE = _pool.FindServiceByName(SERVICE_NAME)


def message(name: str) -> type:
    """The message class `inference.<name>` ("ModelInferRequest", "ModelInferResponse.InferOutputTensor")."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


def data_type(name: str) -> int:
    """The number of a DataType value ("TYPE_STRING")."""
    return _pool.FindEnumTypeByName(f"{PACKAGE}.DataType").values_by_name[name].number


ServerLiveResponse = message("ServerLiveResponse")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
ModelStreamInferResponse = message("ModelStreamInferResponse")
InferParameter = message("InferParameter")
ModelConfigResponse = message("ModelConfigResponse")
ModelConfig = message("ModelConfig")
ModelStatisticsResponse = message("ModelStatisticsResponse")
RepositoryIndexResponse = message("RepositoryIndexResponse")
