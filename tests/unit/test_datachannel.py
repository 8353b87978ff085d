"""weightrelay.datachannel and the pulls that use it (peers.PeerChannels): a set pulled on a peer's data
channel lands exactly as over gRPC, in plaintext and over TLS; a reader that cannot reach the channel
pulls over gRPC instead, then and after; a ticket opens one connection only; bad input is refused.
The peer here is a real gRPC server whose GetWeights streams a real WeightStore (of the numpy adapter of
test_store_stream_sums), as a worker's does: this tests the channel, not a framework."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.support import REPO, free_port
from tests.unit.test_store_stream_sums import Caller, worker
from weightrelay import codec, datachannel
from weightrelay.client import WORKER_SERVICE, WorkerClient
from weightrelay.errors import Refused
from weightrelay.peers import PeerChannels
from weightrelay.security import ClientSecurity, ServerSecurity
from weightrelay.v1 import worker_pb2 as pb


class Peer:
    """A gRPC server answering GetWeights from a store (seed 1), offering its data channel when one is given."""

    def __init__(self, data_channel: datachannel.DataChannelServer | None, security: ServerSecurity | None = None):
        self.store = worker(1)
        self.data_channel = data_channel
        self.asked: list[pb.GetWeightsRequest] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "GetWeights": grpc.unary_stream_rpc_method_handler(self.get_weights, request_deserializer=pb.GetWeightsRequest.FromString,
                                                               response_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString()),
            "SetWeights": grpc.stream_unary_rpc_method_handler(self.set_weights, request_deserializer=codec.decode_chunk,
                                                               response_serializer=pb.SetWeightsReply.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(WORKER_SERVICE, handlers),))
        credentials = security.credentials() if security is not None else None
        address = "127.0.0.1:0"
        self.port = self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def get_weights(self, request: pb.GetWeightsRequest, context):
        """As WorkerServicer.GetWeights streams."""
        self.asked.append(request)
        messages = self.store.stream(self.store.open_send(context, request.transposed), request.max_chunk_bytes, request.pack_pieces)
        if request.data_channel and self.data_channel is not None:
            messages = self.data_channel.send(messages, context.is_active)
        try:
            yield from messages
        except Refused as refused:
            context.abort(refused.code, refused.message)

    def set_weights(self, request_iterator, context):
        """As WorkerServicer.SetWeights receives."""
        asked = datachannel.asks_for_it(context.invocation_metadata())
        self.asked.append(asked)
        messages = self.data_channel.receive(context) if asked and self.data_channel is not None else request_iterator
        try:
            with contextlib.closing(messages) if asked else contextlib.nullcontext():
                received = self.store.receive(messages)
        except codec.TensorError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self.store.apply(received, Caller(), "SetWeights")

    def stop(self) -> None:
        self.server.stop(0)
        if self.data_channel is not None:
            self.data_channel.close()


def pulled(peer: Peer, security: ClientSecurity | None = None, puller: PeerChannels | None = None):
    receiver = worker(2)
    puller = puller or PeerChannels(security)
    received = puller.pull(pb.PullWeightsRequest(address=peer.address, expected_sha256=peer.store.sha256), 30, receiver)
    reply = receiver.apply(received, Caller(), "PullWeights")
    return receiver, reply


def assert_same_set(receiver, peer: Peer) -> None:
    sent, got = peer.store.adapter.get_weights(), receiver.adapter.get_weights()
    assert sent.keys() == got.keys() and all(np.array_equal(sent[n], got[n]) for n in sent)
    assert receiver.sha256 == peer.store.sha256


@pytest.fixture
def certs(tmp_path) -> Path:
    subprocess.run([str(REPO / "docker" / "make-certs.sh"), str(tmp_path / "certs")], check=True, capture_output=True)
    return tmp_path / "certs"


def test_a_pull_on_the_data_channel_lands_the_exact_set():
    peer = Peer(datachannel.DataChannelServer("127.0.0.1"))
    try:
        receiver, reply = pulled(peer)
        assert [a.data_channel for a in peer.asked] == [True] and reply.sha256 == peer.store.sha256
        assert_same_set(receiver, peer)
    finally:
        peer.stop()


def test_a_pull_over_tls_uses_the_data_channel_with_tls(certs):
    server = ServerSecurity(str(certs / "server.crt"), str(certs / "server.key"))
    peer = Peer(datachannel.DataChannelServer("127.0.0.1", 0, server), server)
    try:
        puller = PeerChannels(ClientSecurity(str(certs / "ca.crt")))
        receiver, _ = pulled(peer, puller=puller)
        assert_same_set(receiver, peer)
        assert [a.data_channel for a in peer.asked] == [True] and not puller._over_grpc  # no fallback hid a failed handshake
        with socket.create_connection(("127.0.0.1", peer.data_channel.port), timeout=5) as plain:  # TLS only
            plain.sendall(b"\0" * datachannel.TICKET_BYTES)
            plain.settimeout(5)
            try:
                answer = plain.recv(64)
            except ConnectionResetError:
                answer = b""
            assert answer == b"" or answer[:1] == b"\x15"  # closed, or a TLS alert: no stream for a plaintext reader
    finally:
        peer.stop()


def test_a_peer_whose_data_channel_cannot_be_reached_is_pulled_from_over_grpc(caplog):
    closed = free_port()  # the offer names a port nobody listens on, as behind a firewall that refuses
    channel = datachannel.DataChannelServer("127.0.0.1")
    channel.port = closed
    peer = Peer(channel)
    try:
        puller = PeerChannels()
        receiver, _ = pulled(peer, puller=puller)
        assert_same_set(receiver, peer)
        assert [a.data_channel for a in peer.asked] == [True, False] and "pulling over gRPC instead" in caplog.text
        pulled(peer, puller=puller)  # the next pull from that peer does not ask again
        assert [a.data_channel for a in peer.asked] == [True, False, False]
        puller.drop(peer.address)  # a peer reached anew (restarted) is asked again
        pulled(peer, puller=puller)
        assert [a.data_channel for a in peer.asked][-2:] == [True, False]
    finally:
        peer.stop()


def test_a_peer_without_a_data_channel_streams_over_grpc():
    peer = Peer(None)
    try:
        receiver, _ = pulled(peer)
        assert [a.data_channel for a in peer.asked] == [True]  # asked, and the stream came over gRPC
        assert_same_set(receiver, peer)
    finally:
        peer.stop()


def test_a_client_reads_weights_on_the_data_channel_decoded_or_as_bytes():
    """WorkerClient.get_weights and get_weights_serialized (the coordinator's forwarding) read on the channel too."""
    peer = Peer(datachannel.DataChannelServer("127.0.0.1"))
    try:
        with WorkerClient(peer.address, timeout=30) as client:
            sent = peer.store.adapter.get_weights()
            got = client.get_weights()
            assert got.keys() == sent.keys() and all(np.array_equal(got[n], sent[n]) for n in sent)
            messages = list(client.get_weights_serialized())
            assert all(isinstance(m, bytes) for m in messages) and codec.holds_digest(messages[-1])
            assert codec.receive_weights([codec.decode_chunk(m) for m in messages])[1] == peer.store.sha256
            assert [a.data_channel for a in peer.asked] == [True, True] and client.data_channel
    finally:
        peer.stop()


def test_a_client_that_cannot_reach_the_data_channel_reads_over_grpc(caplog):
    channel = datachannel.DataChannelServer("127.0.0.1")
    channel.port = free_port()  # offered, unreachable
    peer = Peer(channel)
    try:
        with WorkerClient(peer.address, timeout=30) as client:
            assert codec.receive_weights([codec.decode_chunk(m) for m in client.get_weights_serialized()])[1] == peer.store.sha256
            assert not client.data_channel and "reading weights over gRPC instead" in caplog.text
            assert client.get_weights().keys() == peer.store.adapter.get_weights().keys()
            assert [a.data_channel for a in peer.asked] == [True, False, False]
    finally:
        peer.stop()


def offered(channel: datachannel.DataChannelServer, messages: list[bytes]):
    """send()'s reply generator and its offer, as GetWeights starts it; the stream waits for its reader."""
    replies = channel.send((m for m in messages), lambda: True)
    return replies, next(replies).data_channel


def test_a_ticket_opens_one_connection_and_a_wrong_one_none():
    channel = datachannel.DataChannelServer("127.0.0.1")
    messages = list(codec.encode_weight_chunks({"w": np.arange(6, dtype=np.float32)}, sha256="0" * 64))
    try:
        replies, offer = offered(channel, messages)
        wrong = pb.DataChannelOffer(port=offer.port, ticket=bytes(datachannel.TICKET_BYTES))
        with datachannel.connect("127.0.0.1:1", wrong, ClientSecurity()) as stranger:
            assert list(datachannel.read_messages(stranger, time.monotonic() + 5)) == []  # closed at once
        with datachannel.connect("127.0.0.1:1", offer, ClientSecurity()) as reader:
            assert next(replies, None) is None  # all sent, the connection closed: the call ends
            got = list(datachannel.read_messages(reader, time.monotonic() + 5))
        assert got == [codec.decode_chunk(m) for m in messages]
        with datachannel.connect("127.0.0.1:1", offer, ClientSecurity()) as again:
            assert list(datachannel.read_messages(again, time.monotonic() + 5)) == []  # used once already
    finally:
        channel.close()


def test_a_reader_that_never_comes_is_given_up_and_the_stream_closed(monkeypatch):
    monkeypatch.setattr(datachannel, "OFFER_SECONDS", 0.3)
    channel = datachannel.DataChannelServer("127.0.0.1")
    closed = []

    def stream():
        try:
            yield b"\x12\x00"
        finally:
            closed.append(True)

    try:
        replies = channel.send(stream(), lambda: True)
        next(replies)
        with pytest.raises(Refused) as info:
            next(replies)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "did not open the data channel" in info.value.message
        assert closed == [True] and channel._tickets == []
    finally:
        channel.close()


def test_a_message_longer_than_a_stream_message_is_refused():
    listener = socket.create_server(("127.0.0.1", 0))
    with socket.create_connection(listener.getsockname()) as reader, listener.accept()[0] as writer:
        writer.sendall((datachannel.MAX_MESSAGE_BYTES + 1).to_bytes(4, "little"))
        with pytest.raises(datachannel.DataChannelError, match="more than a stream message holds"):
            next(datachannel.read_messages(reader, time.monotonic() + 5))
    listener.close()


@pytest.mark.parametrize("address,host", [("127.0.0.1:5", "127.0.0.1"), ("torch-worker:50051", "torch-worker"), ("[::1]:7", "::1"),
                                          ("dns:///torch-worker:50051", None), ("unix:/tmp/s", None), ("::1", None), ("host", None)])
def test_the_host_of_an_address(address, host):
    assert datachannel.host_of(address) == host


def test_an_offer_and_a_stream_message_are_told_apart():
    offer = pb.WeightsChunk(data_channel=pb.DataChannelOffer(port=5, ticket=b"t" * 32)).SerializeToString()
    assert datachannel.decode_reply(offer) == pb.DataChannelOffer(port=5, ticket=b"t" * 32)
    message = next(codec.encode_weight_chunks({"w": np.ones(3, np.float32)}, sha256="0" * 64))
    assert datachannel.decode_reply(message) == codec.decode_chunk(message)


def writer(peer: Peer) -> WorkerClient:
    """A client of the peer that takes SetWeights on its data channel (as its Describe would say)."""
    client = WorkerClient(peer.address, timeout=30)
    client.accepts_data_channel = True
    return client


def test_a_set_sent_on_the_data_channel_lands_exactly():
    peer = Peer(datachannel.DataChannelServer("127.0.0.1"))
    try:
        sent = worker(3).adapter.get_weights()
        with writer(peer) as client:
            reply = client.set_weights(sent)
            assert client.data_channel and peer.asked == [True]
        assert reply.sha256 == peer.store.sha256 == codec.weights_sha256(sent)
        held = peer.store.adapter.get_weights()
        assert all(np.array_equal(held[n], sent[n]) for n in sent)
    finally:
        peer.stop()


def test_a_refused_set_on_the_data_channel_changes_nothing_and_is_told_at_once():
    peer = Peer(datachannel.DataChannelServer("127.0.0.1"))
    try:
        before = peer.store.sha256
        wrong = {"fc.weight": np.zeros((1050, 299), np.float32), "fc.bias": np.zeros(1050, np.float32)}
        with writer(peer) as client, pytest.raises(grpc.RpcError) as info:
            started = time.monotonic()
            client.set_weights(wrong, max_chunk_bytes=64 * 1024)  # many messages: the writer is still writing when refused
        assert time.monotonic() - started < datachannel.IO_SECONDS / 2
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fc.weight" in info.value.details()
        assert peer.store.sha256 == before and peer.asked == [True]
    finally:
        peer.stop()


def test_a_writer_that_cannot_reach_the_data_channel_sends_over_grpc(caplog):
    channel = datachannel.DataChannelServer("127.0.0.1")
    channel.port = free_port()
    peer = Peer(channel)
    try:
        sent = worker(4).adapter.get_weights()
        with writer(peer) as client:
            assert client.set_weights(sent).sha256 == codec.weights_sha256(sent)
            assert not client.data_channel and "sending weights over gRPC instead" in caplog.text
            client.set_weights(worker(5).adapter.get_weights())
        assert peer.asked == [True, False, False]  # asked once, then over gRPC
    finally:
        peer.stop()


def test_call_metadata_asks_and_offers():
    assert datachannel.asks_for_it([("authorization", "x"), (datachannel.ASK_METADATA, "1")])
    assert not datachannel.asks_for_it([(datachannel.ASK_METADATA, "0")]) and not datachannel.asks_for_it(None)
    offer = datachannel.offer_from_metadata([(datachannel.OFFER_METADATA, f"5 {'ab' * 32}")])
    assert offer == pb.DataChannelOffer(port=5, ticket=bytes.fromhex("ab" * 32))
    for bad in ("5", "x ab", "5 zz", ""):
        assert datachannel.offer_from_metadata([(datachannel.OFFER_METADATA, bad)]) is None
    assert datachannel.offer_from_metadata([]) is None
