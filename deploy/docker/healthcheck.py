"""The images' HEALTHCHECK: one `grpc.health.v1.Health/Check`; exit 0 when SERVING, 1 otherwise.

Usage: healthcheck.py [TARGET [SERVICE]], by default 127.0.0.1:50051 and the overall health (""). The
server reports NOT_SERVING while it drains, so an orchestrator stops routing to it before it exits.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TIMEOUT_SECONDS = 3.0  # below the HEALTHCHECK --timeout, so a hung server reads as unhealthy, not killed


def check(target: str = DEFAULT_TARGET, service: str = "", timeout: float = TIMEOUT_SECONDS) -> str:
    """The serving status's name (SERVING, NOT_SERVING, ...), or the gRPC error code's name."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str]) -> int:
    target = argv[0] if argv else DEFAULT_TARGET
    service = argv[1] if len(argv) > 1 else ""
    status = check(target, service)
    print(f"{target} {service or '(overall)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
