"""Flower's way of moving one weight set, for `bench.transfer` to stand beside ours.

Run by the Flower virtual environment's interpreter (flwr pins an older protobuf than this
project, so this file imports nothing from it): `python flower_peer.py DIR` loads the arrays
DIR/*.npy (the sender's set, saved by bench.transfer), starts a receiver process, and times
moves the way Flower moves parameters (`python flower_peer.py DIR [REPEATS]`): `ndarrays_to_parameters`
and `parameters_to_proto` on the sender, one unary gRPC message (message size limits lifted),
`parameters_from_proto` and `parameters_to_ndarrays` on the receiver, which then answers. Prints one
JSON line: the fastest move's seconds, bytes, GB/s and the receiver's peak RSS, and the median
seconds of all moves; or the error that stopped the move.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.serde import parameters_from_proto, parameters_to_proto
from flwr.proto.transport_pb2 import Parameters

METHOD = "/weightrelay.bench.Flower/Send"
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def serve() -> None:
    """The receiver: decode what arrives, answer with the bytes decoded and this process's peak RSS."""

    def receive(message: Parameters, context) -> bytes:
        Path("/proc/self/clear_refs").write_text("5")  # the peak of this move only
        arrays = parameters_to_ndarrays(parameters_from_proto(message))
        return json.dumps({"bytes": sum(a.nbytes for a in arrays), "receiver_peak_rss_bytes": peak_rss()}).encode()

    handler = grpc.method_handlers_generic_handler(METHOD.split("/")[1], {
        METHOD.split("/")[2]: grpc.unary_unary_rpc_method_handler(receive, request_deserializer=Parameters.FromString)})
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler], options=UNLIMITED)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    parent = os.getppid()
    while os.getppid() == parent:  # the sender may be killed (out of memory at 3 GiB): then leave too
        time.sleep(0.5)


def send(directory: Path, repeats: int) -> dict:
    """The fastest of `repeats` moves over one connection, and their median (as bench.transfer reports its own)."""
    arrays = [np.load(path) for path in sorted(directory.glob("*.npy"))]
    receiver = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(receiver.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=UNLIMITED) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            call = channel.unary_unary(METHOD, request_serializer=Parameters.SerializeToString)
            best, times = None, []
            for _ in range(repeats):
                started = time.perf_counter()
                try:
                    reply = json.loads(call(parameters_to_proto(ndarrays_to_parameters(arrays)), timeout=3600))
                except (grpc.RpcError, ValueError, MemoryError) as exc:
                    detail = exc.details() if isinstance(exc, grpc.RpcError) else f"{type(exc).__name__}: {exc}"
                    return {"error": detail[:300]}
                seconds = time.perf_counter() - started
                times.append(seconds)
                if best is None or seconds < best["seconds"]:
                    best = {"seconds": seconds, "gb_per_second": reply["bytes"] / seconds / 1e9, **reply}
    finally:
        receiver.kill()
        receiver.wait()
    return {**best, "median_seconds": statistics.median(times), "repeats": repeats}


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        print(json.dumps(send(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)))
