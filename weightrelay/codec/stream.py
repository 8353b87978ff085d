"""A weight set rebuilt from a weights stream: pieces written straight into the arrays returned,
every rule of worker.proto checked along the way, and the set's checksum computed as the bytes
arrive (on a thread of its own for large pieces). Returns a whole, verified set or raises
TensorError: nothing partial.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np

from weightrelay.codec.checksum import tensor_header, weights_sha256
from weightrelay.codec.tensors import (TensorError, TensorSpec, WeightSet, check_against_manifest, check_finite, checked_spec,
                                       fmt_shape, native_view, storage_dtype)
from weightrelay.codec.wire import StreamMessage, WireDigest, WirePiece, stream_message
from weightrelay.v1 import worker_pb2 as pb

#: Pieces at least this large are hashed on a thread beside the receive (see _BackgroundHash); below,
#: starting the thread costs more than hashing inline.
_BACKGROUND_HASH_BYTES = 1024 * 1024
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
    strides); it holds every byte `write` was given once `complete` returns. `checked_finite`, read after
    `complete`: True if the sink found every value finite itself (the receive then does not scan it again);
    False leaves the scan, and the error naming a NaN's place, to the receive."""

    array: np.ndarray
    checked_finite: bool

    def write(self, data: memoryview) -> None: ...

    def complete(self) -> None: ...


def receive_weights(
    chunks: Iterable[pb.WeightsChunk | StreamMessage], manifest: Mapping[str, TensorSpec] | None = None,
    allocate: Callable[[TensorSpec], np.ndarray] = _empty, sink: Callable[[TensorSpec], TensorSink | None] | None = None,
) -> tuple[WeightSet, str]:
    """Rebuild a weight set from a weights stream, checking it all along; also return its verified checksum.

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
    themselves and checked like any other, in the sink's `array`, once the sink is complete.
    """
    hasher = _BackgroundHash()
    try:
        return _receive(chunks, _Assembler(manifest, allocate, hasher, sink))
    finally:
        hasher.close()  # nothing reads the arrays once this returns


def _receive(chunks: Iterable[pb.WeightsChunk | StreamMessage], assembler: _Assembler) -> tuple[WeightSet, str]:
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
    sink that takes them), and how many bytes the pieces so far have filled."""

    __slots__ = ("spec", "array", "view", "sink", "filled")

    def __init__(self, spec: TensorSpec, array: np.ndarray, sink: TensorSink | None = None) -> None:
        self.spec = spec
        self.array = array
        self.sink = sink
        self.view = None if sink is not None else memoryview(array.reshape(-1)).cast("B")
        self.filled = 0


class _Assembler:
    """The tensors of one stream as its pieces arrive (`add`), checked against the stream rules and
    the manifest; `finish` checks the whole against the digest and returns it.

    While the tensors arrive in name order, each whole, the checksum is fed as they come (the
    tensor's header at its first piece, then its bytes); once the order breaks, the set is hashed
    when complete instead."""

    def __init__(self, manifest: Mapping[str, TensorSpec] | None, allocate: Callable[[TensorSpec], np.ndarray],
                 hasher: _BackgroundHash, sink: Callable[[TensorSpec], TensorSink | None] | None = None) -> None:
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
            tensor = self._start(spec, piece.offset)
        elif tensor.spec != spec:
            raise TensorError(
                f"tensor {spec.name}: pieces disagree on dtype or shape "
                f"({tensor.spec.dtype.upper()} {fmt_shape(tensor.spec.shape)} "
                f"then {spec.dtype.upper()} {fmt_shape(spec.shape)})"
            )
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

    def _start(self, spec: TensorSpec, offset: int) -> _Received:
        """A new tensor, at its first piece: refused unless that piece starts at offset 0 and the tensor
        is one of the manifest's (without a manifest: no larger than 64 GiB) before any memory is given to it."""
        if offset != 0:
            raise TensorError(f"tensor {spec.name}: first piece starts at offset {offset}, expected 0")
        if self._manifest is not None:
            check_against_manifest(spec, self._manifest)
        if self._manifest is None and spec.nbytes > _MAX_UNCHECKED_BYTES:
            raise TensorError(f"tensor {spec.name}: shape {fmt_shape(spec.shape)} is larger than 64 GiB")
        sink = self._sink(spec) if self._sink is not None else None
        tensor = self._tensors[spec.name] = _Received(spec, sink.array, sink) if sink is not None else _Received(spec, self._allocate(spec))
        last = self._last
        if last is not None and (spec.name <= last.spec.name or last.filled != last.spec.nbytes):
            self._in_order = False  # not in name order, or the previous tensor is not complete yet
        self._last = tensor
        if self._in_order:
            self._hasher.update(tensor_header(spec))
        return tensor

    def finish(self, digest: WireDigest) -> tuple[WeightSet, str]:
        """The set and its checksum, once it is whole (every manifest tensor, every tensor's bytes),
        agrees with the digest's count, bytes and checksum, and (with a manifest) holds only finite values.
        A checksum mismatch is reported before non-finite values: a damaged stream is named as such first."""
        self._check_whole()
        self._check_counts(digest)
        for tensor in self._tensors.values():
            if tensor.sink is not None:
                tensor.sink.complete()
        weights = {name: native_view(tensor.spec, tensor.array) for name, tensor in self._tensors.items()}
        checked = {name for name, tensor in self._tensors.items() if tensor.sink is not None and tensor.sink.checked_finite}
        not_finite = self._non_finite(weights, checked)  # while the hashing thread catches up with the last pieces
        actual = self._hasher.hexdigest() if self._in_order else weights_sha256(weights)
        if digest.sha256.lower() != actual:
            raise TensorError(f"checksum mismatch: the digest says sha256 {digest.sha256!r}, the tensors received hash to {actual!r}")
        if not_finite is not None:
            raise not_finite
        return weights, actual

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


class _BackgroundHash:
    """SHA-256 on a thread of its own, fed as bytes arrive: hashlib releases the GIL on large buffers,
    so hashing a piece overlaps receiving the next instead of adding to it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: bytes | memoryview) -> None:
        if len(data) < _BACKGROUND_HASH_BYTES and self._thread is None:
            self._hash.update(data)  # small sets: a thread would cost more than it saves
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def close(self) -> None:
        """Wait until everything given is hashed (the data must not change before)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()
