"""Domain errors -> gRPC status: code, message and `google.rpc` details (the README's error table).

`status_of` is the one mapping: `BadRequest` field violations and an `ErrorInfo` naming field, value and
allowed range for an InvalidArgument, `RetryInfo` for what passes (Unavailable, ResourceExhausted), and
INTERNAL with a message that hides the cause for anything that is not a domain error.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import InvalidArgument, ResourceExhausted, SeqserveError, Unavailable, shown

ERROR_DOMAIN = "seqserve.v1"


def status_of(error: BaseException) -> grpc.Status:
    """The gRPC status (code, message, `grpc-status-details-bin` trailer) a domain error is answered with."""
    if isinstance(error, SeqserveError):
        code_name, message = error.code, error.message
    else:
        code_name, message = "INTERNAL", f"internal error ({type(error).__name__}); see the server log"
    details = [error_details_pb2.ErrorInfo(reason=_reason(error), domain=ERROR_DOMAIN,
                                           metadata=_error_metadata(error))]
    if isinstance(error, InvalidArgument):
        details.append(error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
            field=error.field or "", description=message, reason=_reason(error))]))
    if isinstance(error, (Unavailable, ResourceExhausted)):
        # Both pass: the queue drains, the model finishes loading, another replica takes over.
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)))
    status = status_pb2.Status(code=getattr(code_pb2, code_name), message=message,
                               details=[_pack(detail) for detail in details])
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the call with the status of `error` (raises, as `context.abort` does)."""
    status = status_of(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _reason(error: BaseException) -> str:
    code = error.code if isinstance(error, SeqserveError) else "INTERNAL"
    if isinstance(error, InvalidArgument) and error.field is not None:
        return "INVALID_FIELD"
    return code


def _error_metadata(error: BaseException) -> dict[str, str]:
    if not isinstance(error, InvalidArgument) or error.field is None:
        return {}
    return {"field": error.field, "value": shown(error.value), "allowed": error.allowed or ""}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
