"""A typed client of one worker, used by the coordinator, the tests and users' own scripts.

    from weightrelay.client import WorkerClient
    with WorkerClient("127.0.0.1:50051") as torch_worker:
        print(torch_worker.describe().framework)
        weights = torch_worker.get_weights()      # {name: numpy array}, canonical layout
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import time
from typing import Iterable, Iterator, Mapping

import grpc
import numpy as np

from weightrelay import codec, datachannel
from weightrelay.datachannel import DataChannelError
from weightrelay.leases import METADATA_KEY as LEASE_METADATA_KEY
from weightrelay.security import ClientSecurity
from weightrelay.v1 import worker_pb2 as pb
from weightrelay.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("weightrelay.client")

#: The full name of the contract's service ("weightrelay.v1.Worker").
WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name
#: Calls that change nothing, or end in the same state when repeated, are retried with backoff
#: while the worker is UNAVAILABLE (starting, restarting); Train and SetWeights are not.
RETRIED_METHODS = ("Describe", "Initialize", "Evaluate", "GetWeights")
SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": WORKER_SERVICE, "method": method} for method in RETRIED_METHODS],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.5s",
            "maxBackoff": "8s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})
CHANNEL_OPTIONS = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # Ping an idle or busy connection every 30 s; a worker that does not answer within 10 s
    # (stopped, unplugged) fails the calls on it with UNAVAILABLE instead of hanging them.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

#: Clients of workers (the coordinator above all) go without gRPC's BDP probing: with it gRPC widens
#: a stream's receive window as fast as data comes, so a coordinator forwarding a large set would hold
#: about twice as much of it in flight, for no gain in speed. gRPC's default window is kept (a wider
#: fixed one held more in flight and did not move small sets faster). The CHANGELOG has the figures.
CLIENT_OPTIONS = CHANNEL_OPTIONS + [("grpc.http2.bdp_probe", 0)]


def decoded_get_weights(channel: grpc.Channel, decode=codec.decode_chunk) -> grpc.UnaryStreamMultiCallable:
    """GetWeights on `channel`, its messages read by `decode` (codec.decode_chunk: the tensor bytes are not
    copied); built once per channel (by a client, by a worker for each peer it pulls from)."""
    return channel.unary_stream(f"/{WORKER_SERVICE}/GetWeights", request_serializer=pb.GetWeightsRequest.SerializeToString,
                                response_deserializer=decode)


class DataChannelFailed(grpc.RpcError):
    """A GetWeights stream's data channel broke: raised as the call's UNAVAILABLE, so that callers handle it
    as they handle a broken gRPC stream."""

    def __init__(self, address: str, error: Exception):
        super().__init__(f"the data channel of {address}: {error}")
        self._details = str(self)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


class WeightsStream:
    """A GetWeights reply's messages (decoded, or serialized), from the worker's data channel where it offers
    one and the client reaches it, else from the call; the call starts at once, the messages are read as they
    are iterated; cancel() ends the call and the connection. A data channel the client cannot reach makes it
    ask again over gRPC, and the client asks that worker for none after (WorkerClient.data_channel)."""

    def __init__(self, client: "WorkerClient", request: pb.GetWeightsRequest, timeout: float | None, serialized: bool):
        self._client, self._request, self._serialized = client, request, serialized
        self._deadline = None if timeout is None else time.monotonic() + timeout
        request.data_channel = client.data_channel and datachannel.host_of(client.address) is not None
        self._call = self._start()
        self._connection = None
        self._messages: Iterator | None = None

    def _start(self):
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        return (self._client._get_raw if self._serialized else self._client._get_decoded)(self._request, timeout=timeout)

    def _open(self) -> Iterator:
        if not self._request.data_channel:
            return self._call
        first = next(self._call, None)
        offer = first if isinstance(first, pb.DataChannelOffer) else None
        if self._serialized and first is not None and datachannel.is_offer(first):
            offer = pb.WeightsChunk.FromString(first).data_channel
        if offer is None:  # a worker without a data channel: the stream came over gRPC
            return itertools.chain(() if first is None else (first,), self._call)
        try:
            self._connection = datachannel.connect(self._client.address, offer, self._client.security)
        except DataChannelError as exc:
            log.warning("%s: %s; reading weights over gRPC instead, now and from now on", self._client.address, exc)
            self._call.cancel()
            self._client.data_channel = self._request.data_channel = False
            self._call = self._start()
            return self._call
        read = datachannel.read_serialized if self._serialized else datachannel.read_messages
        return datachannel.through_digest(read(self._connection, self._deadline), self._call)

    def __iter__(self) -> "WeightsStream":
        return self

    def __next__(self):
        try:
            if self._messages is None:
                self._messages = self._open()
            return next(self._messages)
        except DataChannelError as exc:
            raise DataChannelFailed(self._client.address, exc) from None

    def cancel(self) -> None:
        self._call.cancel()
        if self._connection is not None:
            self._connection.close()


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _LeaseMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the client's lease id (when it holds one) to every call's metadata (worker.proto, Leases)."""

    def __init__(self, client: "WorkerClient"):
        self._client = client

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        lease_id = self._client.lease_id
        if not lease_id:
            return details
        metadata = [*(details.metadata or ()), (LEASE_METADATA_KEY, lease_id)]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class WorkerClient:
    """`timeout` is the default deadline (seconds) of each call; None waits as long as it takes.

    `lease_id`: the worker's lease this client holds (set by `initialize(lease=...)`, or by hand to
    take a run's lease back); every call then carries it (worker.proto, Leases)."""

    def __init__(self, address: str, timeout: float | None = None, security: ClientSecurity | None = None, lease_id: str = ""):
        self.address = address
        self.timeout = timeout
        self.lease_id = lease_id
        self.security = security or ClientSecurity()
        #: move weight streams on the worker's data channel where it offers one (off once it could not be reached)
        self.data_channel = True
        self._plain_channel = self.security.channel(address, CLIENT_OPTIONS)
        self.channel = grpc.intercept_channel(self._plain_channel, _LeaseMetadata(self))
        self.stub = pb_grpc.WorkerStub(self.channel)
        #: what the last Describe said: SetWeights takes packed streams (worker.proto, WeightsChunk)
        self.accepts_packed_pieces = False
        #: what the last Describe said: SetWeights takes its stream on the worker's data channel
        self.accepts_data_channel = False
        #: what the last Describe said: the matrices SetWeights takes transposed (forwarded streams ask the sender for them so)
        self.receives_transposed: tuple[str, ...] = ()
        # GetWeights and SetWeights as wire bytes, never decoded (see get/set_weights_serialized)
        self._get_raw = self.channel.unary_stream(f"/{WORKER_SERVICE}/GetWeights", request_serializer=pb.GetWeightsRequest.SerializeToString)
        self._set_raw = self.channel.stream_unary(f"/{WORKER_SERVICE}/SetWeights", response_deserializer=pb.SetWeightsReply.FromString)
        self._get_decoded = decoded_get_weights(self.channel, datachannel.decode_reply)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._plain_channel.close()

    def wait_ready(self, timeout: float) -> None:
        """Block until the channel connects; raises grpc.FutureTimeoutError."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def describe(self, timeout: float | None = None) -> pb.DescribeReply:
        reply = self.stub.Describe(pb.DescribeRequest(), timeout=self._deadline(timeout))
        self.accepts_packed_pieces = reply.accepts_packed_pieces
        self.accepts_data_channel = reply.accepts_data_channel
        self.receives_transposed = tuple(reply.receives_transposed)
        return reply

    def initialize(self, model: pb.ModelSpec | str = "mlp", seed: int = 0, dataset: str = "", objective: str = "",
                   timeout: float | None = None, lease: pb.LeaseRequest | None = None) -> pb.InitializeReply:
        """Rebuild the worker's model with fresh weights from `seed` (a built-in name or a full spec);
        with `lease`, take the worker's lease too (this client then holds its id)."""
        spec = pb.ModelSpec(name=model) if isinstance(model, str) else model
        request = pb.InitializeRequest(model=spec, seed=seed, dataset=dataset, objective=objective, lease=lease)
        reply = self.stub.Initialize(request, timeout=self._deadline(timeout))
        self.receives_transposed = ()  # a new model may hold other matrices transposed: canonical until the next Describe
        if reply.lease.lease_id:
            self.lease_id = reply.lease.lease_id
        return reply

    def renew_lease(self, seconds: int = 0, timeout: float | None = None) -> pb.Lease:
        """Extend the lease this client holds (by its duration, or `seconds`) from now."""
        return self.stub.RenewLease(pb.RenewLeaseRequest(lease_id=self.lease_id, seconds=seconds), timeout=self._deadline(timeout))

    def release_lease(self, force: bool = False, timeout: float | None = None) -> pb.ReleaseLeaseReply:
        """End the lease this client holds (with `force`: whatever lease the worker holds); the client holds none after."""
        reply = self.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id=self.lease_id, force=force), timeout=self._deadline(timeout))
        self.lease_id = ""
        return reply

    def train(self, request: pb.TrainRequest, timeout: float | None = None) -> Iterator[pb.TrainEvent]:
        """The Train stream, ended by the worker at its deadline (default none: training takes what it takes);
        cancel it by calling .cancel() on the returned iterator."""
        return self.stub.Train(request, timeout=timeout)

    def train_to_end(self, request: pb.TrainRequest, timeout: float | None = None) -> pb.TrainSummary:
        summary = None
        for event in self.train(request, timeout):
            if event.WhichOneof("event") == "summary":
                summary = event.summary
        if summary is None:
            raise RuntimeError(f"worker {self.address}: the Train stream ended without a summary")
        return summary

    def evaluate(self, include_predictions: bool = False, include_probabilities: bool = False,
                 timeout: float | None = None) -> pb.EvaluateReply:
        request = pb.EvaluateRequest(include_predictions=include_predictions, include_probabilities=include_probabilities)
        return self.stub.Evaluate(request, timeout=self._deadline(timeout))

    def get_weights(self, max_chunk_bytes: int = 0, timeout: float | None = None) -> codec.WeightSet:
        """The worker's weights, checked against the stream's digest (asked for packed: fewer messages)."""
        request = pb.GetWeightsRequest(max_chunk_bytes=max_chunk_bytes, pack_pieces=True)
        stream = WeightsStream(self, request, self._deadline(timeout), serialized=False)
        try:
            return codec.assemble_weights(stream)
        finally:
            stream.cancel()  # after the digest nothing is left of it but its end

    def set_weights(self, weights: Mapping[str, np.ndarray], max_chunk_bytes: int = 0, timeout: float | None = None) -> pb.SetWeightsReply:
        """Replace the worker's weights; packed when the last Describe said the worker takes that."""
        chunks = codec.encode_weight_chunks(weights, max_chunk_bytes, pack=self.accepts_packed_pieces)
        return self.set_weights_serialized(chunks, timeout)

    def get_weights_serialized(self, max_chunk_bytes: int = 0, timeout: float | None = None, pack: bool = False,
                               transposed: Iterable[str] = ()) -> WeightsStream:
        """The GetWeights stream as the wire bytes of its messages, never decoded (for forwarding);
        `pack`: a packed stream, for a receiver that takes them (accepts_packed_pieces); `transposed`: the
        matrices a receiver takes transposed (its receives_transposed), sent so where the sender holds them so."""
        request = pb.GetWeightsRequest(max_chunk_bytes=max_chunk_bytes, pack_pieces=pack, transposed=transposed)
        return WeightsStream(self, request, self._deadline(timeout), serialized=True)

    def set_weights_serialized(self, chunks: Iterable[bytes], timeout: float | None = None) -> pb.SetWeightsReply:
        """SetWeights from messages already serialized (codec.encode_weight_chunks, or a forwarded stream): on
        the worker's data channel where the last Describe said it takes that and the client reaches it, else
        over gRPC (and over gRPC from then on, where the channel could not be reached)."""
        timeout = self._deadline(timeout)
        if not (self.accepts_data_channel and self.data_channel and datachannel.host_of(self.address)):
            return self._set_raw(chunks, timeout=timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        call = self._set_raw.future(iter(()), timeout=timeout, metadata=((datachannel.ASK_METADATA, "1"),))
        offer = datachannel.offer_from_metadata(call.initial_metadata())
        if offer is None:  # refused before its offer (a lease, admission): the call's status says why
            return call.result()
        try:
            connection = datachannel.connect(self.address, offer, self.security)
        except DataChannelError as exc:
            log.warning("%s: %s; sending weights over gRPC instead, now and from now on", self.address, exc)
            call.cancel()
            self.data_channel = False
            return self._set_raw(chunks, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        try:
            with connection:
                datachannel.write_messages(connection, chunks)
        except OSError:  # the worker refused the stream and closed the channel, or the channel broke: its status says which
            pass
        except BaseException:
            call.cancel()
            raise
        return call.result()  # the worker checked the whole stream (or raises its refusal)

    def set_weights_stream(self, chunks: Iterator[pb.WeightsChunk], timeout: float | None = None) -> pb.SetWeightsReply:
        """Send a raw weights stream (for tools and tests that build their own)."""
        return self.stub.SetWeights(chunks, timeout=self._deadline(timeout))
