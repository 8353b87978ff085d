"""Server plumbing shared by every worker: flags, data, gRPC server, health, reflection."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightrelay.adapter import FrameworkAdapter
from weightrelay.data import DataError, load_mnist
from weightrelay.files import write_json_atomic
from weightrelay.objectives import parse_objective
from weightrelay.service import WorkerServicer
from weightrelay.v1 import worker_pb2 as pb
from weightrelay.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("weightrelay.worker")

NO_DOWNLOAD_ENV = "WEIGHTRELAY_NO_DOWNLOAD"
WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_server(servicer: WorkerServicer, host: str, port: int, max_workers: int = 8) -> RunningServer:
    """Serve `servicer` with the standard health and reflection services; port 0 picks a free one."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"))
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (WORKER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}; is the port in use?") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}; is the port in use?")
    server.start()
    for service in ("", WORKER_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, bound)


def worker_parser(framework: str, default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{framework}-worker", description=f"weightrelay {framework} worker: serves weightrelay.v1.Worker over gRPC."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port to listen on; 0 picks a free one (default {default_port})")
    parser.add_argument("--data-dir", default=None, help="MNIST directory (default $WEIGHTRELAY_DATA_DIR, else ~/.cache/weightrelay/mnist)")
    parser.add_argument("--no-download", action="store_true", default=os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"),
                        help=f"fail instead of downloading missing MNIST files (default: on when ${NO_DOWNLOAD_ENV} is set)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    parser.add_argument("--objective", default="identity", help='default label objective for Train requests that name none (default "identity")')
    parser.add_argument("--ready-file", type=Path, default=None, help="write {\"port\": ..., \"pid\": ...} here once serving")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def worker_main(adapter_factory: Callable[[str, int], FrameworkAdapter], framework: str, default_port: int, argv: Sequence[str] | None = None) -> int:
    """Run a worker until SIGINT or SIGTERM. Returns the process exit code."""
    args = worker_parser(framework, default_port).parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {framework}-worker %(levelname)s %(message)s", stream=sys.stderr)
    try:
        objective = parse_objective(args.objective)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        data = load_mnist(args.data_dir, download=not args.no_download)
    except DataError as exc:
        log.error("%s", exc)
        return 3
    try:
        adapter = adapter_factory(args.device, args.seed)
    except (ValueError, RuntimeError) as exc:
        log.error("cannot build the %s model: %s", framework, exc)
        return 4
    servicer = WorkerServicer(adapter, data, objective)
    try:
        running = start_server(servicer, args.host, args.port)
    except OSError as exc:
        log.error("%s", exc)
        return 5

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    version, backend = adapter.versions()
    log.info(
        "ready on %s:%d (%s %s, %s, device %s, data %s fingerprint %s)",
        args.host, running.port, framework, version, backend, adapter.device(), data.data_dir, data.fingerprint[:12],
    )
    if args.ready_file:
        write_json_atomic(args.ready_file, {"port": running.port, "pid": os.getpid(), "framework": framework})
    stop.wait()
    log.info("shutting down")
    running.stop()
    return 0
