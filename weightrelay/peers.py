"""The channels a worker keeps to the peers it pulls weights from (PullWeights), and the pulls themselves:
on the peer's data channel where it offers one and this worker reaches it, else over gRPC."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import grpc

from weightrelay import codec, datachannel
from weightrelay.client import CHANNEL_OPTIONS, decoded_get_weights
from weightrelay.datachannel import DataChannelError
from weightrelay.errors import Refused
from weightrelay.security import ClientSecurity
from weightrelay.store import Received, WeightStore
from weightrelay.v1 import worker_pb2 as pb

log = logging.getLogger("weightrelay.peers")

#: A pull's channel to its peer, without the client's retries: a sender killed as the pull began would
#: leave a retried GetWeights waiting until the caller's deadline; without retries the pull fails at once,
#: UNAVAILABLE, and the coordinator reports the sender unreachable (or forwards, which meets the same end).
PEER_OPTIONS = [option for option in CHANNEL_OPTIONS if option[0] not in ("grpc.service_config", "grpc.enable_retries")] + [("grpc.enable_retries", 0)]
#: Open channels to peers kept (the least recently used is closed first).
MAX_PEERS = 8


@dataclass(frozen=True)
class Peer:
    """A kept channel to a peer, with its GetWeights call built once (client.decoded_get_weights)."""

    channel: grpc.Channel
    get_weights: grpc.UnaryStreamMultiCallable  # its replies read by datachannel.decode_reply


class _Unreachable(Exception):
    """The peer offered its data channel and this worker could not open it (the pull goes over gRPC)."""


class PeerChannels:
    """Channels to peers, kept open between pulls: a relay pulls from the same few peers every round,
    and a new channel costs a connection and starts again from gRPC's smallest flow-control window,
    which its BDP probing widens as data comes. At most MAX_PEERS are kept."""

    def __init__(self, security: ClientSecurity | None = None):
        self.security = security or ClientSecurity()  # how a pull reaches a peer
        self._peers: dict[str, Peer] = {}
        self._over_grpc: set[str] = set()  # peers whose data channel this worker could not reach
        self._lock = threading.Lock()

    def get(self, address: str) -> Peer:
        with self._lock:
            peer = self._peers.pop(address, None)
            if peer is None:
                channel = self.security.channel(address, PEER_OPTIONS)
                peer = Peer(channel, decoded_get_weights(channel, datachannel.decode_reply))
            self._peers[address] = peer  # the most recently used last
            while len(self._peers) > MAX_PEERS:
                self._peers.pop(next(iter(self._peers))).channel.close()
            return peer

    def pull(self, request: pb.PullWeightsRequest, timeout: float | None, store: WeightStore) -> Received:
        """A peer's set, streamed from its GetWeights into `store` and checked like a SetWeights (apply it
        with store.apply). Refuses what the peer could not send, what does not fit, or another checksum than
        the request expects. Asks for the peer's data channel, unless it could not be reached before; where
        it cannot be reached now, the pull asks again over gRPC and later pulls from that peer go so too."""
        address = request.address
        chunk = request.max_chunk_bytes and max(request.max_chunk_bytes, codec.MIN_CHUNK_BYTES)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # the matrices this model holds transposed come as the peer holds them, where it holds them so too
            asked = pb.GetWeightsRequest(max_chunk_bytes=chunk, pack_pieces=True, transposed=sorted(store.receives_transposed),
                                         data_channel=address not in self._over_grpc and datachannel.host_of(address) is not None)
            try:
                received = self._receive(address, asked, deadline, store)
            except _Unreachable as exc:
                log.warning("pulling from %s: %s; pulling over gRPC instead, now and from now on", address, exc)
                with self._lock:
                    self._over_grpc.add(address)
                asked.data_channel = False
                received = self._receive(address, asked, deadline, store)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.drop(address)
            code = exc.code() if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else grpc.StatusCode.FAILED_PRECONDITION
            raise Refused(code, f"pulling from {address}: {exc.code().name}: {exc.details()}") from None
        except DataChannelError as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"pulling from {address}: {exc}") from None
        except codec.TensorError as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"the weights of {address} do not fit this model: {exc}") from None
        if request.expected_sha256 and received.sha256 != request.expected_sha256.lower():
            store.discard(received)
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{address} sent sha256 {received.sha256[:12]}..., "
                          f"expected {request.expected_sha256[:12]}...: is that the right worker?")
        return received

    def _receive(self, address: str, asked: pb.GetWeightsRequest, deadline: float | None, store: WeightStore) -> Received:
        """One GetWeights call's set, from its data channel where the peer offers it, else from the call."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        stream = self.get(address).get_weights(asked, timeout=timeout)
        try:
            first = next(stream, None)
            if not isinstance(first, pb.DataChannelOffer):
                return store.receive(codec.until_digest(itertools.chain(() if first is None else (first,), stream)))
            try:
                connection = datachannel.connect(address, first, self.security)
            except DataChannelError as exc:
                raise _Unreachable(str(exc)) from None
            log.info("pull from %s: on its data channel (port %d)", address, first.port)
            with connection:
                return store.receive(datachannel.through_digest(datachannel.read_messages(connection, deadline), stream))
        finally:
            stream.cancel()  # the digest was the last message: nothing of the stream is left but its end

    def drop(self, address: str) -> None:
        """Close the channel to a peer that could not be reached: the next pull opens a new one."""
        with self._lock:
            peer = self._peers.pop(address, None)
            self._over_grpc.discard(address)  # a peer reached anew may be reached on its data channel too
        if peer is not None:
            peer.channel.close()

    def close(self) -> None:
        """Close every kept channel (the server has stopped)."""
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            peer.channel.close()
