"""Moving a weight set from one worker to another, without the coordinator ever holding it.

Two paths. **pull** (the default where it works): the coordinator asks the receiver to pull from
the sender (PullWeights); the set goes worker to worker in one hop. **forward** (when the workers
cannot reach each other, or on request): the coordinator streams the sender's GetWeights messages
into the receiver's SetWeights as they arrive, as raw bytes: never decoded, never a whole set in
memory. Either way the receiver checks the digest and applies all or nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import grpc

from weightrelay import codec, errors
from weightrelay.client import WorkerClient
from weightrelay.v1 import worker_pb2 as pb

#: Pull failures after which forwarding is tried: the receiver cannot reach the sender (or is an
#: older worker without PullWeights), or what it reached is not the expected sender.
FALL_BACK_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)
#: Reasons (`weightrelay.errors`) of a refused pull that forwarding cannot get round: a Train holds
#: the model, and a forwarded set would be refused for the same reason.
NO_FALL_BACK_FOR = frozenset({errors.WORKER_TRAINING})


def falls_back(error: grpc.RpcError) -> bool:
    """Whether a failed pull is worth forwarding instead: decided by its status code and its
    machine-readable reason, never by its message (written for people; it may change)."""
    return error.code() in FALL_BACK_ON and errors.reason_of(error) not in NO_FALL_BACK_FOR


@dataclass
class Move:
    path: str            # "pull" or "forward"
    seconds: float
    bytes: int
    tensors: int
    sha256: str
    why_forward: str = ""  # when forwarding: why the pull was not used

    @property
    def gb_per_second(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def to_dict(self) -> dict:
        return {**asdict(self), "gb_per_second": self.gb_per_second}


class SenderFailed(Exception):
    """A forwarded move failed on the sender's side (its GetWeights stream broke): `error` is its gRPC error."""

    def __init__(self, sender: WorkerClient, error: grpc.RpcError):
        super().__init__(f"{sender.address}: {error.code().name}: {error.details()}")
        self.sender, self.error = sender, error


def forward(sender: WorkerClient, receiver: WorkerClient, timeout: float | None = None) -> pb.SetWeightsReply:
    """Relay the sender's GetWeights messages into the receiver's SetWeights as raw bytes, as they arrive
    (packed where the receiver's last Describe said it takes that: a small set is one message; the matrices it
    said it takes transposed asked for so: the sender sends them without converting where it holds them so).
    Raises SenderFailed when the sender's stream broke (the receiver then refused a stream without its digest)."""
    broken: list[grpc.RpcError] = []
    # Asked for before the receiver's call starts: the sender takes its snapshot meanwhile.
    stream = sender.get_weights_serialized(timeout=timeout, pack=receiver.accepts_packed_pieces, transposed=receiver.receives_transposed)

    def pieces():
        try:
            for message in stream:
                yield message
                if codec.holds_digest(message):  # the stream's last message: the receiver need not wait for the sender's end
                    return
        except grpc.RpcError as exc:
            broken.append(exc)  # end the stream here: the receiver refuses it, nothing is applied

    try:
        return receiver.set_weights_serialized(pieces(), timeout=timeout)
    except grpc.RpcError:
        if broken:
            raise SenderFailed(sender, broken[0]) from None
        raise
    finally:
        stream.cancel()  # when the receiver failed first; after the digest, the sender's stream has nothing left


def move(sender: WorkerClient, receiver: WorkerClient, via_coordinator: bool = False, expected_sha256: str = "",
         timeout: float | None = None) -> Move:
    """Move the sender's weights into the receiver: pulled by the receiver where it can, else forwarded."""
    why = "--via-coordinator" if via_coordinator else ""
    started = time.perf_counter()
    if not via_coordinator:
        try:
            request = pb.PullWeightsRequest(address=sender.address, expected_sha256=expected_sha256)
            reply = receiver.stub.PullWeights(request, timeout=timeout)
            return Move("pull", time.perf_counter() - started, reply.total_bytes, reply.tensor_count, reply.sha256)
        except grpc.RpcError as exc:
            if not falls_back(exc):
                raise
            why = f"{exc.code().name}: {exc.details()}"
            started = time.perf_counter()
    reply = forward(sender, receiver, timeout)
    return Move("forward", time.perf_counter() - started, reply.total_bytes, reply.tensor_count, reply.sha256, why)
