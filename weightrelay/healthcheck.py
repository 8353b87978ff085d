"""`python -m weightrelay.healthcheck HOST:PORT`: exit 0 when the worker's gRPC health service
says SERVING. For container healthchecks, where no grpcurl or grpc_health_probe is installed.
Health needs no token; with TLS, pass --tls-ca (and a client certificate where the worker requires one)."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weightrelay.security import ClientSecurity, SecurityError, add_client_flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weightrelay.healthcheck")
    parser.add_argument("address", help="HOST:PORT of the worker")
    parser.add_argument("--service", default="weightrelay.v1.Worker", help="service to ask about ('' for the server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    add_client_flags(parser)
    args = parser.parse_args(argv)
    security = ClientSecurity(args.tls_ca, args.tls_cert, args.tls_key, None, args.tls_server_name)
    try:
        with security.channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except SecurityError as exc:
        print(f"{args.address}: {exc}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
