"""A weight set rebuilt from a weights stream: pieces written straight into the arrays returned,
every rule of worker.proto checked along the way, and the set's checksum computed as the bytes
arrive (on a thread of its own for large pieces). Returns a whole, verified set or raises
TensorError: nothing partial. A matrix sent transposed (Tensor.transposed) goes only to a sink that takes
it so; its stream is then checked against the stream's own checksum (WeightsDigest.stream_sha256).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np

from weightrelay.codec.checksum import BackgroundHash, stream_header, stream_sha256
from weightrelay.codec.tensors import (TensorError, TensorSpec, WeightSet, check_against_manifest, check_finite, checked_spec,
                                       fmt_shape, native_view, storage_dtype)
from weightrelay.codec.wire import StreamMessage, WireDigest, WirePiece, stream_message
from weightrelay.v1 import worker_pb2 as pb

#: A set checksum as a sender states it: lower- or upper-case hex.
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: Largest tensor accepted without a manifest to check it against (a header alone must not make a receiver allocate without bound).
_MAX_UNCHECKED_BYTES = 1 << 36


def assemble_weights(
    chunks: Iterable[pb.WeightsChunk | StreamMessage], manifest: Mapping[str, TensorSpec] | None = None
) -> WeightSet:
    """Rebuild a weight set from a weights stream, checking it all along (see receive_weights)."""
    return receive_weights(chunks, manifest)[0]


def _empty(spec: TensorSpec) -> np.ndarray:
    return np.empty(spec.shape, dtype=storage_dtype(spec.dtype))


class TensorSink(Protocol):
    """Where a tensor's bytes go instead of an array of the codec's (weightrelay.conversion: straight into a
    framework's layout). `array` shows the tensor as received (its spec's shape and storage dtype, any
    strides); it holds every byte `write` was given once `complete` returns. A sink for a matrix sent
    transposed (asked for with `transposed=True`) is given the transpose's bytes; its `array` still shows
    the canonical tensor. `checked_finite`, read after `complete`: True if the sink found every value
    finite itself (the receive then does not scan it again); False leaves the scan, and the error naming a
    NaN's place, to the receive."""

    array: np.ndarray
    checked_finite: bool

    def write(self, data: memoryview) -> None: ...

    def complete(self) -> None: ...


@dataclass(frozen=True)
class ReceivedStream:
    """A verified set as receive_stream returns it: the set's checksum, and for a stream that sent matrices
    transposed, their names and the stream's own checksum (checked against the bytes that came)."""

    weights: WeightSet
    sha256: str
    transposed: frozenset[str] = frozenset()
    stream_sha256: str = ""


def receive_weights(
    chunks: Iterable[pb.WeightsChunk | StreamMessage], manifest: Mapping[str, TensorSpec] | None = None,
    allocate: Callable[[TensorSpec], np.ndarray] = _empty, sink: Callable[..., TensorSink | None] | None = None,
) -> tuple[WeightSet, str]:
    """Rebuild a weight set from a weights stream, checking it all along; also return its checksum (receive_stream)."""
    received = receive_stream(chunks, manifest, allocate, sink)
    return received.weights, received.sha256


def receive_stream(
    chunks: Iterable[pb.WeightsChunk | StreamMessage], manifest: Mapping[str, TensorSpec] | None = None,
    allocate: Callable[[TensorSpec], np.ndarray] = _empty, sink: Callable[..., TensorSink | None] | None = None,
) -> ReceivedStream:
    """Rebuild a weight set from a weights stream, checking it all along.

    With a `manifest` (what the receiver's model holds) every tensor is checked against it as
    soon as its first piece arrives, so a wrong stream is refused before it is buffered, and
    the finished set must hold exactly the manifest's tensors with finite values. The digest
    (count, bytes, checksum) is always checked. Raises TensorError; returns nothing partial.

    Pieces are written straight into the arrays that are returned (no second copy), and while the
    tensors arrive in name order (as `iter_weight_chunks` sends them) the checksum is computed as
    the bytes come, overlapping the transfer; other orders are hashed once complete. `allocate`
    gives the array a tensor is received into (little-endian, `storage_dtype`); a worker passes
    buffers it reuses (weightrelay.buffers). `sink(spec)`, where given, may instead take a tensor's
    bytes as they come (a TensorSink: weightrelay.conversion); such a tensor is hashed from the pieces
    themselves and checked like any other, in the sink's `array`, once the sink is complete. A matrix sent
    transposed needs `sink(spec, transposed=True)` to take it (else TensorError). The checksum returned is
    the one the receiver verified itself, except for a stream that sent matrices transposed: that stream's
    own checksum is verified, and the set's is the sender's (the canonical bytes are never all there).
    """
    hasher = BackgroundHash()
    try:
        return _receive(chunks, _Assembler(manifest, allocate, hasher, sink))
    finally:
        hasher.close()  # nothing reads the arrays once this returns


def _receive(chunks: Iterable[pb.WeightsChunk | StreamMessage], assembler: _Assembler) -> ReceivedStream:
    """Each message's pieces into `assembler`, refusing a message that holds nothing or comes after
    the digest; then the finished, verified set."""
    digest: WireDigest | None = None
    for message in chunks:
        if digest is not None:
            raise TensorError("the weights stream goes on after its digest; the digest must be the last message")
        if not isinstance(message, StreamMessage):
            message = stream_message(message)
        if not message.pieces and message.digest is None:
            raise TensorError("a weights stream message holds neither a tensor piece nor the digest")
        for piece in message.pieces:
            assembler.add(piece)
        digest = message.digest
    if digest is None:
        raise TensorError("the weights stream ended without its digest message")
    return assembler.finish(digest)


class _Received:
    """One tensor being received: its spec, the array it is written into and that array's bytes (or the
    sink that takes them), how many bytes the pieces so far have filled, and whether they are the transpose's."""

    __slots__ = ("spec", "array", "view", "sink", "filled", "transposed")

    def __init__(self, spec: TensorSpec, array: np.ndarray, sink: TensorSink | None = None, transposed: bool = False) -> None:
        self.spec = spec
        self.array = array
        self.sink = sink
        self.view = None if sink is not None else memoryview(array.reshape(-1)).cast("B")
        self.filled = 0
        self.transposed = transposed


class _Assembler:
    """The tensors of one stream as its pieces arrive (`add`), checked against the stream rules and
    the manifest; `finish` checks the whole against the digest and returns it.

    While the tensors arrive in name order, each whole, the checksum is fed as they come (the
    tensor's header at its first piece, then its bytes); once the order breaks, the set is hashed
    when complete instead."""

    def __init__(self, manifest: Mapping[str, TensorSpec] | None, allocate: Callable[[TensorSpec], np.ndarray],
                 hasher: BackgroundHash, sink: Callable[..., TensorSink | None] | None = None) -> None:
        self._manifest = manifest
        self._sink = sink
        self._allocate = allocate
        self._hasher = hasher
        self._tensors: dict[str, _Received] = {}
        self._last: _Received | None = None  # the tensor started most recently
        self._in_order = True

    def add(self, piece: WirePiece) -> None:
        """Write a piece into its tensor's array: it must agree with the tensor's earlier pieces on
        dtype and shape, start where they ended, and not run past the tensor's size."""
        spec = checked_spec(piece)
        tensor = self._tensors.get(spec.name)
        if tensor is None:
            tensor = self._start(spec, piece.offset, piece.transposed)
        elif tensor.spec != spec:
            raise TensorError(
                f"tensor {spec.name}: pieces disagree on dtype or shape "
                f"({tensor.spec.dtype.upper()} {fmt_shape(tensor.spec.shape)} "
                f"then {spec.dtype.upper()} {fmt_shape(spec.shape)})"
            )
        elif tensor.transposed != piece.transposed:
            raise TensorError(f"tensor {spec.name}: pieces disagree on whether it is sent transposed; all of a tensor's pieces must say the same")
        elif tensor is not self._last:
            self._in_order = False  # pieces of tensors interleave
        done = tensor.filled
        if piece.offset != done:
            raise TensorError(
                f"tensor {spec.name}: piece at offset {piece.offset}, expected offset {done} "
                "(pieces of a tensor must be consecutive and in order)"
            )
        data = piece.data
        if done + len(data) > spec.nbytes:
            raise TensorError(
                f"tensor {spec.name}: received more than {spec.nbytes} bytes "
                f"(shape {fmt_shape(spec.shape)} of {spec.dtype.upper()})"
            )
        if tensor.sink is not None:
            tensor.sink.write(data)
            written = data  # the message's bytes: they stay as they are while the hash holds them
        else:
            tensor.view[done : done + len(data)] = data
            written = tensor.view[done : done + len(data)]
        tensor.filled = done + len(data)
        if self._in_order:
            self._hasher.update(written)

    def _start(self, spec: TensorSpec, offset: int, transposed: bool) -> _Received:
        """A new tensor, at its first piece: refused unless that piece starts at offset 0 and the tensor
        is one of the manifest's (without a manifest: no larger than 64 GiB), and, sent transposed, a matrix
        a sink takes so, before any memory is given to it."""
        if offset != 0:
            raise TensorError(f"tensor {spec.name}: first piece starts at offset {offset}, expected 0")
        if self._manifest is not None:
            check_against_manifest(spec, self._manifest)
        if self._manifest is None and spec.nbytes > _MAX_UNCHECKED_BYTES:
            raise TensorError(f"tensor {spec.name}: shape {fmt_shape(spec.shape)} is larger than 64 GiB")
        if transposed:
            sink = self._transposed_sink(spec)
        else:
            sink = self._sink(spec) if self._sink is not None else None
        tensor = _Received(spec, sink.array, sink, transposed) if sink is not None else _Received(spec, self._allocate(spec))
        self._tensors[spec.name] = tensor
        last = self._last
        if last is not None and (spec.name <= last.spec.name or last.filled != last.spec.nbytes):
            self._in_order = False  # not in name order, or the previous tensor is not complete yet
        self._last = tensor
        if self._in_order:
            self._hasher.update(stream_header(spec, transposed))
        return tensor

    def _transposed_sink(self, spec: TensorSpec) -> TensorSink:
        """The sink for a matrix sent transposed; TensorError if it is no matrix or this receiver does not take it so."""
        if len(spec.shape) != 2:
            raise TensorError(f"tensor {spec.name}: sent transposed, but shape {fmt_shape(spec.shape)} is not a matrix; only a matrix can be")
        sink = self._sink(spec, transposed=True) if self._sink is not None else None
        if sink is None:
            raise TensorError(f"tensor {spec.name}: sent transposed, which this receiver does not take for it "
                              f"(see its DescribeReply.receives_transposed); send it as {fmt_shape(spec.shape)}")
        return sink

    def finish(self, digest: WireDigest) -> ReceivedStream:
        """The set and its checksum, once it is whole (every manifest tensor, every tensor's bytes),
        agrees with the digest's count, bytes and checksum (the stream's own, where it sent matrices
        transposed), and (with a manifest) holds only finite values.
        A checksum mismatch is reported before non-finite values: a damaged stream is named as such first."""
        self._check_whole()
        self._check_counts(digest)
        for tensor in self._tensors.values():
            if tensor.sink is not None:
                tensor.sink.complete()
        weights = {name: native_view(tensor.spec, tensor.array) for name, tensor in self._tensors.items()}
        checked = {name for name, tensor in self._tensors.items() if tensor.sink is not None and tensor.sink.checked_finite}
        not_finite = self._non_finite(weights, checked)  # while the hashing thread catches up with the last pieces
        transposed = frozenset(name for name, tensor in self._tensors.items() if tensor.transposed)
        actual = self._hasher.hexdigest() if self._in_order else stream_sha256(weights, transposed)
        field, expected = ("stream_sha256", digest.stream_sha256) if transposed else ("sha256", digest.sha256)
        if transposed and not (_SHA256.fullmatch(digest.sha256) and digest.stream_sha256):
            raise TensorError(f"the stream sends {', '.join(sorted(transposed))} transposed, so its digest needs both the set's "
                              f"sha256 (64 hex digits; it has {digest.sha256[:70]!r}) and the stream's stream_sha256 (it has {digest.stream_sha256[:70]!r})")
        if expected.lower() != actual:
            raise TensorError(f"checksum mismatch: the digest says {field} {expected!r}, the tensors received hash to {actual!r}")
        if not_finite is not None:
            raise not_finite
        if transposed:
            return ReceivedStream(weights, digest.sha256.lower(), transposed, actual)
        return ReceivedStream(weights, actual)

    def _check_whole(self) -> None:
        """Raise TensorError if a manifest tensor never came or a tensor's pieces stopped short of its size."""
        if self._manifest is not None:
            missing = [name for name in self._manifest if name not in self._tensors]
            if missing:
                raise TensorError(f"missing tensor(s) {', '.join(missing)}; a weight set must hold all of {', '.join(self._manifest)}")
        for name, tensor in self._tensors.items():
            spec = tensor.spec
            if tensor.filled != spec.nbytes:
                raise TensorError(
                    f"tensor {name}: received {tensor.filled} bytes, expected {spec.nbytes} "
                    f"(shape {fmt_shape(spec.shape)} of {spec.dtype.upper()})"
                )

    def _check_counts(self, digest: WireDigest) -> None:
        """Raise TensorError unless the digest's tensor count and byte total are the stream's."""
        total = sum(tensor.filled for tensor in self._tensors.values())
        if digest.tensor_count != len(self._tensors) or digest.total_bytes != total:
            raise TensorError(
                f"digest says {digest.tensor_count} tensors and {digest.total_bytes} bytes, "
                f"the stream held {len(self._tensors)} tensors and {total} bytes"
            )

    def _non_finite(self, weights: WeightSet, checked: set[str]) -> TensorError | None:
        """With a manifest, the error naming the first tensor that holds NaN or Inf (of those its sink did not
        find all finite: `checked`); None otherwise."""
        if self._manifest is None:
            return None
        try:
            for name, array in weights.items():
                if name not in checked:
                    check_finite(name, array)
        except TensorError as exc:
            return exc
        return None
