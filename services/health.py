"""`clotho health --target host:port`: ask a service's grpc.health.v1 whether it serves.

Exit status 0 when the answer is SERVING, 1 otherwise (no answer, NOT_SERVING, unknown
service). Container health checks run it, so images need no grpc_health_probe binary.
The target defaults to $CLOTHO_HEALTH_TARGET, else 127.0.0.1:50051.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_TARGET = "127.0.0.1:50051"


def check(target: str, service: str = "", timeout: float = 3.0) -> bool:
    """True when `target` answers SERVING for `service` ("" is the whole server)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            print(f"{target}: {err.code().name}", file=sys.stderr)
            return False
    serving = bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return serving


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clotho health", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=os.environ.get("CLOTHO_HEALTH_TARGET") or DEFAULT_TARGET)
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    return 0 if check(args.target, args.service, args.timeout) else 1


if __name__ == "__main__":
    raise SystemExit(main())
