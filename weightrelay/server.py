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
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from google.protobuf.message import DecodeError

from weightrelay import codec, models
from weightrelay.adapter import FrameworkAdapter
from weightrelay.buffers import keep_freed_memory
from weightrelay.client import WORKER_SERVICE
from weightrelay.datachannel import DataChannelServer
from weightrelay.data import DATA_DIR_ENV, DATA_ROOT_ENV, DATASETS, DEFAULT_DATASET, DataError, load_dataset
from weightrelay.files import write_json_atomic
from weightrelay.security import HANDLER_KINDS, ClientSecurity, SecurityError, ServerSecurity, resolve_token
from weightrelay.service import MAX_MODEL_CALLS, InitializeError, WorkerServicer, abort
from weightrelay.v1 import worker_pb2 as pb

log = logging.getLogger("weightrelay.worker")

NO_DOWNLOAD_ENV = "WEIGHTRELAY_NO_DOWNLOAD"
#: grpcio-reflection serves only v1alpha; v1 has the same messages byte for byte under another
#: package name, so the same servicer answers it too (grpcurl and newer clients ask v1 first).
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def _reflection_v1_handler(servicer: reflection.ReflectionServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    })


#: Threads: room for every admitted model call, plus a reserve that health checks, Describe and refused calls
#: always find free; calls past MAX_CONCURRENT_RPCS get RESOURCE_EXHAUSTED from gRPC itself.
RESERVE_THREADS = 16
MAX_CONCURRENT_RPCS = 256
#: Keepalive: answer clients' pings (coordinators ping idle channels) and drop dead peers.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class Undecodable:
    """What the lenient deserializer hands over for bytes that are no valid message of the method."""

    def __init__(self, type_name: str, error: str):
        self.message = f"the request is not a valid {type_name}: {error}"


def _lenient(message_class) -> Callable[[bytes], object]:
    """Parse requests without letting gRPC answer INTERNAL for bad bytes: hand an Undecodable on instead.
    A weights stream's messages are read by codec.decode_chunk (their tensor bytes are not copied)."""
    decode = codec.decode_chunk if message_class is pb.WeightsChunk else message_class.FromString

    def parse(data: bytes) -> object:
        try:
            return decode(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)

    return parse


def _checked_unary(behaviour: Callable) -> Callable:
    def handle(request, context):
        if isinstance(request, Undecodable):
            log.warning("refused an undecodable request: %s", request.message)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behaviour(request, context)

    return handle


def _checked_stream(behaviour: Callable) -> Callable:
    def messages(iterator):
        for index, message in enumerate(iterator):
            if isinstance(message, Undecodable):
                log.warning("refused an undecodable stream message: %s", message.message)
                raise codec.TensorError(f"message {index} of the stream: {message.message}")
            yield message

    def handle(request_iterator, context):
        return behaviour(messages(request_iterator), context)

    return handle


def _serializer(message_class) -> Callable[[object], bytes]:
    """Replies are messages, or bytes a servicer serialized itself (GetWeights' stream: codec.encode_weight_chunks)."""
    serialize = message_class.SerializeToString

    def encode(reply: object) -> bytes:
        return reply if isinstance(reply, bytes) else serialize(reply)

    return encode


def worker_handler(servicer: WorkerServicer) -> grpc.GenericRpcHandler:
    """The Worker service's method handlers, each parsing its requests leniently (bad bytes: INVALID_ARGUMENT)."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Worker"].methods:
        request_class, reply_class = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        kind = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        wrapped = _checked_stream(behaviour) if method.client_streaming else _checked_unary(behaviour)
        handlers[method.name] = kind(wrapped, request_deserializer=_lenient(request_class), response_serializer=_serializer(reply_class))
    return grpc.method_handlers_generic_handler(WORKER_SERVICE, handlers)


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    data_channel: DataChannelServer | None = None

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls, give the calls in flight `grace` seconds, then cancel them (a Train stops at its next batch)."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.data_channel is not None:
            self.data_channel.close()


def start_server(servicer: WorkerServicer, host: str, port: int, security: ServerSecurity | None = None,
                 data_port: int | None = 0) -> RunningServer:
    """Serve `servicer` with the standard health and reflection services; port 0 picks a free one. With its
    data channel on `data_port` (0: a free one; None: none), where GetWeights and SetWeights move large
    streams for the callers that ask (datachannel.py)."""
    security = security or ServerSecurity()
    security.credentials()  # bad TLS settings fail here, before the data channel reads them
    data_channel = DataChannelServer(host, data_port, security) if data_port is not None else None
    try:
        running = _start_grpc(servicer, host, port, security)
    except BaseException:
        if data_channel is not None:
            data_channel.close()
        raise
    servicer.data_channel = running.data_channel = data_channel
    return running


def _start_grpc(servicer: WorkerServicer, host: str, port: int, security: ServerSecurity) -> RunningServer:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_MODEL_CALLS + RESERVE_THREADS, thread_name_prefix="rpc"),
        interceptors=security.interceptors(),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    server.add_generic_rpc_handlers((worker_handler(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (WORKER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE)
    reflection_servicer = reflection.ReflectionServicer(services)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection_servicer, server)
    server.add_generic_rpc_handlers((_reflection_v1_handler(reflection_servicer),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = security.credentials()
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
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
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help=f"data set to start with: {', '.join(DATASETS)}, or a directory of IDX files or CIFAR-10 binary batches (default {DEFAULT_DATASET})")
    parser.add_argument("--data-dir", default=None,
                        help=f"directory of the --dataset (default ${DATA_DIR_ENV} for mnist, else ${DATA_ROOT_ENV}/NAME, else ~/.cache/weightrelay/NAME)")
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help=f"model to start with: {models.BUILTIN_HELP} (default {models.DEFAULT_MODEL})")
    parser.add_argument("--no-download", action="store_true", default=os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"),
                        help=f"fail instead of downloading missing data files (default: on when ${NO_DOWNLOAD_ENV} is set)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    parser.add_argument("--objective", default="identity", help='default label objective for Train requests that name none (default "identity")')
    parser.add_argument("--tls-cert", help="server certificate (PEM): serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="the server certificate's private key (PEM)")
    parser.add_argument("--tls-client-ca", help="CA (PEM) whose client certificates are required: mutual TLS")
    parser.add_argument("--peer-tls-ca", help="CA (PEM) of the peers this worker pulls weights from (default --tls-client-ca); "
                                              "with TLS the pull presents --tls-cert and sends the token")
    parser.add_argument("--data-port", type=int, default=0,
                        help="port of the data channel, where pulling workers and clients move large weight streams beside gRPC (default 0: a free one)")
    parser.add_argument("--no-data-channel", action="store_true", help="serve no data channel: weights to and from this worker go over gRPC")
    parser.add_argument("--token-file", help="file with the bearer token every RPC but health must carry (default $WEIGHTRELAY_TOKEN_FILE, else $WEIGHTRELAY_TOKEN; none: no token)")
    parser.add_argument("--stream-idle-timeout", type=float, default=30.0,
                        help="seconds a SetWeights stream may send nothing before it is ended with DEADLINE_EXCEEDED (default 30)")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds the calls in flight get to end on SIGTERM or SIGINT (default 10)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write {\"port\": ..., \"pid\": ...} here once serving")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def worker_main(adapter_factory: Callable[[str], FrameworkAdapter], framework: str, default_port: int, argv: Sequence[str] | None = None) -> int:
    """Run a worker until SIGINT or SIGTERM. Returns the process exit code."""
    args = worker_parser(framework, default_port).parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {framework}-worker %(levelname)s %(message)s", stream=sys.stderr)
    keep_freed_memory()
    try:
        spec = models.load_model(args.model)
    except models.SpecError as exc:
        log.error("--model: %s", exc)
        return 2
    download = not args.no_download

    def load_data(name: str):
        """A data set by name or directory; the start data set keeps its --data-dir."""
        return load_dataset(name, args.data_dir if name == args.dataset else None, download=download)

    try:
        data = load_data(args.dataset)
    except DataError as exc:
        log.error("%s", exc)
        return 3
    try:
        adapter = adapter_factory(args.device)
        servicer = WorkerServicer(adapter, data, load_data, args.objective, dataset_key=args.dataset)
        servicer.stream_idle_seconds = args.stream_idle_timeout
        servicer.initialize(spec, args.seed)
    except ValueError as exc:  # a bad --objective
        log.error("%s", exc)
        return 2
    except InitializeError as exc:
        log.error("cannot build the %s model: %s", framework, exc)
        return 4 if exc.code == grpc.StatusCode.INTERNAL else 2
    except RuntimeError as exc:
        log.error("cannot build the %s model: %s", framework, exc)
        return 4
    try:
        security = ServerSecurity(args.tls_cert, args.tls_key, args.tls_client_ca, resolve_token(args.token_file))
        peer_ca = args.peer_tls_ca or args.tls_client_ca
        servicer.peer_security = ClientSecurity(peer_ca, args.tls_cert if peer_ca else None, args.tls_key if peer_ca else None, security.token)
        running = start_server(servicer, args.host, args.port, security, None if args.no_data_channel else args.data_port)
    except SecurityError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 5

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    version, backend = adapter.versions()
    log.info(
        "ready on %s:%d (%s %s, %s, device %s, data %s in %s fingerprint %s, model %s, %s, %s)",
        args.host, running.port, framework, version, backend, adapter.device(), data.name, data.data_dir, data.fingerprint[:12],
        servicer.model.spec.name, "TLS" + (" with client certificates" if args.tls_client_ca else "") if args.tls_cert else "plaintext",
        "token required" if security.token else "no token",
    )
    if running.data_channel is not None:
        log.info("data channel on %s:%d", args.host, running.data_channel.port)
    if args.ready_file:
        write_json_atomic(args.ready_file, {"port": running.port, "pid": os.getpid(), "framework": framework})
    stop.wait()
    log.info("shutting down: no new calls; the calls in flight get %g s", args.grace)
    running.stop(args.grace)
    servicer.close()
    log.info("stopped")
    # The grace is over: calls still unwinding (a cancelled Train finishing its batch, a stalled stream's
    # reader) must not hold the process, so leave now rather than wait for their threads at exit.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)
