"""The data channel (worker.proto, DataChannelOffer): a weights stream's messages on a plain TCP
connection beside gRPC, for GetWeights (a pulling worker, a client's read, the coordinator's forwarding)
and SetWeights (a client's write, the coordinator's forwarding).

Why: on a large set gRPC's Python layer costs more CPU than the move's real work. A received message
is copied three times before the servicer sees it (slice by slice into a bytearray, then into bytes)
and a sent one once more than needed; for a 1 GiB set those copies are about a fifth of a receiving
worker's CPU and most of a forwarding coordinator's, and a move is CPU-bound. On this connection the
reader reads each message with `recv_into` into memory of its own and the writer writes its messages
as they are.

What it keeps: the messages are exactly those of the gRPC stream, read by the same decoder and
checked by the same receiver (checksum, shapes, finite values; all or nothing). The ticket that opens
a connection is 32 random bytes, good once and for OFFER_SECONDS, and travels only inside the call
(GetWeights' reply, SetWeights' initial metadata), which passed the worker's token check and, with
TLS, its certificate checks; with TLS the connection is TLS too, the worker showing its gRPC server
certificate. A caller that cannot reach the channel sends the call again over gRPC (peers.PeerChannels,
client.WorkerClient), so a firewall costs speed, never the move.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import secrets
import socket
import ssl
import threading
import time
from typing import Callable, Generator, Iterable, Iterator

import grpc
import numpy as np

from weightrelay import codec
from weightrelay.errors import Refused
from weightrelay.security import ClientSecurity, ServerSecurity
from weightrelay.v1 import worker_pb2 as pb

log = logging.getLogger("weightrelay.datachannel")

TICKET_BYTES = 32
#: Seconds a ticket stays good after its offer: the reader connects right after it reads the offer.
OFFER_SECONDS = 10.0
#: Seconds a new connection gets for its TLS handshake and its ticket; a reader gets as long to connect.
HANDSHAKE_SECONDS = 5.0
#: Longest wait for one read or write on a connection (a stalled peer is dropped after it).
IO_SECONDS = 30.0
#: Connections admitted at once (handshake and ticket); more wait in the listen queue.
MAX_ADMITTING = 16
#: The largest message a reader takes: a stream message's tensor bytes and its envelope.
MAX_MESSAGE_BYTES = codec.MAX_CHUNK_BYTES + 64 * 1024
_LENGTH_BYTES = 4
#: Call metadata: a SetWeights call that asks for the data channel, and the worker's offer to it (initial metadata).
ASK_METADATA = "weightrelay-data-channel"
OFFER_METADATA = "weightrelay-data-channel-offer"
#: A WeightsChunk whose first field is data_channel (4, length-delimited): an offer, not a stream message.
_OFFER_KEY = bytes([pb.WeightsChunk.DESCRIPTOR.fields_by_name["data_channel"].number << 3 | 2])


class DataChannelError(OSError):
    """The data channel could not be reached, or broke; the message says where."""


def host_of(address: str) -> str | None:
    """The host of a HOST:PORT or [IPv6]:PORT address; None for other gRPC targets (dns:///..., unix:...)."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not host or "/" in host:
        return None
    if host.startswith("["):
        return host[1:-1] if host.endswith("]") else None
    return None if ":" in host else host


def decode_reply(data: bytes) -> pb.DataChannelOffer | codec.StreamMessage:
    """A GetWeights reply message as a puller reads it: the sender's offer, or a stream message (codec.decode_chunk)."""
    if is_offer(data):
        return pb.WeightsChunk.FromString(data).data_channel
    return codec.decode_chunk(data)


def _recv_exactly(connection: socket.socket, into: memoryview) -> int:
    """Fill `into` from `connection`; the bytes read (fewer only where the peer closed)."""
    done = 0
    while done < len(into):
        count = connection.recv_into(into[done:])
        if count == 0:
            break
        done += count
    return done


# -- the sender's side --------------------------------------------------------------------------------
class _Ticket:
    """An offer waiting for its connection."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(TICKET_BYTES)
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._connection: socket.socket | None = None
        self._open = True

    def redeem(self, connection: socket.socket) -> bool:
        with self._lock:
            if not self._open:
                return False
            self._connection, self._open = connection, False
        self._arrived.set()
        return True

    def wait(self, seconds: float, is_active: Callable[[], bool]) -> socket.socket | None:
        """The connection, once it came within `seconds` while `is_active()`; None otherwise (the ticket is then void)."""
        deadline = time.monotonic() + seconds
        while not self._arrived.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or not is_active():
                break
        with self._lock:
            self._open = False
            return self._connection


class DataChannelServer:
    """A worker's data channel: listens beside its gRPC port; sends and receives the streams offered on it."""

    def __init__(self, host: str, port: int = 0, security: ServerSecurity | None = None):
        security = security or ServerSecurity()
        self._tls: ssl.SSLContext | None = None
        if security.cert and security.key:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(security.cert, security.key)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise OSError(f"the data channel cannot listen on {host}:{port}: {exc.strerror}; is the port in use? (--data-port)") from None
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._tickets: list[_Ticket] = []
        self._lock = threading.Lock()
        self._admitting = threading.BoundedSemaphore(MAX_ADMITTING)
        self._closed = False
        threading.Thread(target=self._accept, name="data-channel", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # out of descriptors or the like: try again
                continue
            self._admitting.acquire()
            threading.Thread(target=self._admit, args=(connection,), name="data-channel-admit", daemon=True).start()

    def _admit(self, connection: socket.socket) -> None:
        """Read a new connection's ticket (after the TLS handshake); hand it to its offer, else close it."""
        try:
            connection.settimeout(HANDSHAKE_SECONDS)
            if self._tls is not None:
                connection = self._tls.wrap_socket(connection, server_side=True)
            secret = bytearray(TICKET_BYTES)
            if _recv_exactly(connection, memoryview(secret)) == TICKET_BYTES and self._redeem(bytes(secret), connection):
                return
            log.debug("closed a data channel connection without a valid ticket")
            connection.close()
        except (OSError, ValueError) as exc:  # a failed handshake, a timeout, a reset
            log.debug("closed a data channel connection: %s", exc)
            connection.close()
        finally:
            self._admitting.release()

    def _redeem(self, secret: bytes, connection: socket.socket) -> bool:
        with self._lock:
            ticket = next((t for t in self._tickets if hmac.compare_digest(t.secret, secret)), None)
            if ticket is None:
                return False
            self._tickets.remove(ticket)
        connection.settimeout(IO_SECONDS)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ticket.redeem(connection)

    def _issue(self) -> _Ticket:
        ticket = _Ticket()
        with self._lock:
            self._tickets.append(ticket)
        return ticket

    def _void(self, ticket: _Ticket) -> None:
        with self._lock:
            if ticket in self._tickets:
                self._tickets.remove(ticket)

    def send(self, messages: Generator[bytes, None, None], is_active: Callable[[], bool]) -> Iterator[pb.WeightsChunk]:
        """GetWeights' reply to a reader that asked for the data channel: one message, the offer; then
        `messages` (serialized stream messages) go on the connection the reader opens with its ticket.
        `messages` is started before the offer (a store's stream gives back what it holds, the model
        among it, only once started) and closed in every case. Refuses (UNAVAILABLE) when the reader
        does not come within OFFER_SECONDS or the connection breaks."""
        ticket = None
        try:
            first = next(messages)
            ticket = self._issue()
            yield pb.WeightsChunk(data_channel=pb.DataChannelOffer(port=self.port, ticket=ticket.secret))
            connection = ticket.wait(OFFER_SECONDS, is_active)
            if connection is None:
                raise Refused(grpc.StatusCode.UNAVAILABLE, f"the reader did not open the data channel within {OFFER_SECONDS:g} s")
            with connection:
                try:
                    write_messages(connection, itertools.chain((first,), messages))
                except OSError as exc:
                    raise Refused(grpc.StatusCode.UNAVAILABLE, f"the data channel to the reader broke: {exc}") from None
        finally:
            if ticket is not None:
                self._void(ticket)
            messages.close()

    def receive(self, context: grpc.ServicerContext) -> Generator[codec.StreamMessage, None, None]:
        """SetWeights' messages for a call that asked for the data channel (asks_for_it): the offer goes out
        as the call's initial metadata, the stream comes on the connection the writer opens with its ticket,
        read to its end (a stream's digest must be its last message). Close it when done: that closes the
        connection, which tells a writer still writing that the stream was refused. Raises DataChannelError
        when the writer does not come within OFFER_SECONDS or the connection breaks."""
        ticket = self._issue()
        try:
            context.send_initial_metadata(((OFFER_METADATA, f"{self.port} {ticket.secret.hex()}"),))
            connection = ticket.wait(OFFER_SECONDS, context.is_active)
            if connection is None:
                raise DataChannelError(f"the writer did not open the data channel within {OFFER_SECONDS:g} s")
            left = context.time_remaining()
            deadline = time.monotonic() + left if left is not None and left < 86400 * 365 else None
            with connection:
                yield from read_messages(connection, deadline)
        finally:
            self._void(ticket)


# -- the caller's side, and the stream on a connection ---------------------------------------------------
def connect(address: str, offer: pb.DataChannelOffer, security: ClientSecurity) -> socket.socket:
    """The connection `offer` opens at the worker reached at `address` (with TLS where `security` has it), its
    ticket sent. Raises DataChannelError."""
    host = host_of(address)
    if host is None:
        raise DataChannelError(f"{address} names no host to reach the data channel at")
    try:
        connection = socket.create_connection((host, offer.port), timeout=HANDSHAKE_SECONDS)
    except OSError as exc:
        raise DataChannelError(f"cannot reach the data channel at {host}:{offer.port}: {exc.strerror or exc}") from None
    try:
        if security.ca or security.cert:
            context = ssl.create_default_context(cafile=security.ca)
            if security.cert:
                context.load_cert_chain(security.cert, security.key)
            connection = context.wrap_socket(connection, server_hostname=security.server_name or host)
        connection.sendall(offer.ticket)
        connection.settimeout(IO_SECONDS)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, ValueError) as exc:
        connection.close()
        raise DataChannelError(f"cannot open the data channel at {host}:{offer.port}: {exc}") from None
    return connection


def _frames(connection: socket.socket, deadline: float | None) -> Iterator[np.ndarray]:
    """The messages on `connection` until the peer closes it, each read into fresh memory (not zeroed: every
    byte is read into). `deadline`: time.monotonic() by which the stream must be in. Raises DataChannelError
    for a connection that breaks, stalls IO_SECONDS, outlasts the deadline, or sends a message too large to be one."""
    header = bytearray(_LENGTH_BYTES)
    while True:
        try:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DataChannelError("the call ran out of time on the data channel")
                connection.settimeout(min(IO_SECONDS, left))
            got = _recv_exactly(connection, memoryview(header))
            if got == 0:
                return
            length = int.from_bytes(header, "little")
            if got < _LENGTH_BYTES or length > MAX_MESSAGE_BYTES:
                raise DataChannelError(f"the data channel sent a message of {length} bytes, more than a stream message holds"
                                        if got == _LENGTH_BYTES else "the data channel ended inside a message's length")
            message = np.empty(length, np.uint8)
            if _recv_exactly(connection, memoryview(message)) < length:
                raise DataChannelError("the data channel ended inside a message")
        except TimeoutError:
            raise DataChannelError(f"the data channel sent nothing for {connection.gettimeout():g} s") from None
        except DataChannelError:
            raise
        except OSError as exc:
            raise DataChannelError(f"the data channel broke: {exc}") from None
        yield message


def read_messages(connection: socket.socket, deadline: float | None = None) -> Iterator[codec.StreamMessage]:
    """The stream messages on `connection`, decoded (codec.decode_chunk: the pieces view the memory read into); see _frames."""
    for message in _frames(connection, deadline):
        yield codec.decode_chunk(memoryview(message))


def read_serialized(connection: socket.socket, deadline: float | None = None) -> Iterator[bytes]:
    """The stream messages on `connection` as bytes (for forwarding: gRPC sends only bytes); see _frames."""
    for message in _frames(connection, deadline):
        yield message.tobytes()


def write_messages(connection: socket.socket, messages: Iterable[bytes]) -> None:
    """Write serialized stream messages on `connection`, each after its length. Raises OSError where it breaks."""
    header = bytearray(_LENGTH_BYTES)
    for message in messages:
        header[:] = len(message).to_bytes(_LENGTH_BYTES, "little")
        connection.sendall(header)
        connection.sendall(message)


def asks_for_it(metadata) -> bool:
    """Whether a call's metadata asks for the data channel (SetWeights; ASK_METADATA)."""
    return any(key == ASK_METADATA and value == "1" for key, value in metadata or ())


def offer_from_metadata(metadata) -> pb.DataChannelOffer | None:
    """The offer in a SetWeights call's initial metadata (OFFER_METADATA: PORT TICKET-HEX), None if it holds none."""
    value = next((v for k, v in metadata or () if k == OFFER_METADATA), None)
    try:
        port, ticket = value.split(" ")
        return pb.DataChannelOffer(port=int(port), ticket=bytes.fromhex(ticket))
    except (AttributeError, ValueError):
        return None


def is_offer(message: bytes) -> bool:
    """Whether a serialized GetWeights reply is an offer (data_channel), not a stream message."""
    return message[:1] == _OFFER_KEY


def through_digest(messages: Iterator, call: Iterator) -> Iterator:
    """A data channel's messages (decoded or serialized) up to and with the digest. Where the channel closes
    before it, the call's status says why (the sender closes the channel, then ends its call with the status
    that stopped it): grpc.RpcError, else DataChannelError."""
    for message in messages:
        yield message
        if (message.digest is not None) if isinstance(message, codec.StreamMessage) else codec.holds_digest(message):
            return
    for _ in call:
        pass
    raise DataChannelError("the data channel closed before the stream's digest")
