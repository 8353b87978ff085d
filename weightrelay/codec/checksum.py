"""The weight-set checksum (worker.proto, top): SHA-256 over the tensors in name order, each as
its header (`tensor_header`) then its little-endian bytes. A sender hashes a whole set with
`weights_sha256`; a receiver hashes a stream as it arrives (codec.stream) with the same header,
so both give the same checksum byte for byte. A stream that sends matrices transposed also carries
the checksum of the stream as sent (`stream_sha256`: the transposed tensors' headers marked).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import AbstractSet, Mapping

import numpy as np

from weightrelay.codec.tensors import TensorSpec, little_endian_view


def tensor_header(spec: TensorSpec) -> bytes:
    """What the set checksum hashes before a tensor's bytes: the UTF-8 name, NUL, the dtype's enum
    name (e.g. "FLOAT32"), NUL, the shape as decimals joined by ",", NUL (see worker.proto).
    The only place this header is built: whole-set and streaming hashes agree because both use it."""
    return spec.name.encode() + b"\0" + spec.dtype.upper().encode() + b"\0" + ",".join(str(d) for d in spec.shape).encode() + b"\0"


#: Follows a transposed tensor's header in a stream's own checksum (worker.proto, WeightsDigest.stream_sha256).
TRANSPOSED_MARK = b"T\0"


def stream_header(spec: TensorSpec, transposed: bool) -> bytes:
    """What a stream's checksum hashes before a tensor's bytes as sent: the set checksum's header, marked
    for a tensor sent transposed (so that a square matrix sent one way never hashes as the other)."""
    return tensor_header(spec) + TRANSPOSED_MARK if transposed else tensor_header(spec)


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """Checksum of a weight set, independent of tensor order (see worker.proto)."""
    return stream_sha256(weights, frozenset())


def stream_sha256(weights: Mapping[str, np.ndarray], transposed: AbstractSet[str]) -> str:
    """Checksum of a weight set as a stream sends it with the matrices `transposed` sent transposed (for none:
    the set's checksum). `weights` holds the canonical tensors (a transposed one is then hashed as its transpose)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = weights[name]
        digest.update(stream_header(TensorSpec.of(name, array), name in transposed))
        digest.update(little_endian_view(array.T if name in transposed else array))  # no copy for little-endian, C-order arrays
    return digest.hexdigest()


#: Bytes at least this large are hashed on BackgroundHash's thread; below, starting the thread costs more than hashing inline.
BACKGROUND_HASH_BYTES = 1024 * 1024
#: Bytes a BackgroundHash lets wait for its thread (a few stream messages, codec.wire.MAX_CHUNK_BYTES each).
HASH_PENDING_BYTES = 32 * 1024 * 1024


class BackgroundHash:
    """SHA-256 on a thread of its own, fed as bytes arrive or leave: hashlib releases the GIL on large buffers,
    so hashing a piece overlaps receiving (or sending) the next instead of adding to it. The bytes given must
    not change until `close` or `hexdigest` returns. At most `pending_bytes` (and at least one piece) wait to
    be hashed: a feeder faster than the hash waits for it, so the pieces it holds (a stream's messages) stay
    few, and each new message reuses the freed memory of one before instead of fresh pages."""

    def __init__(self, pending_bytes: int = HASH_PENDING_BYTES) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._limit = pending_bytes
        self._pending = 0
        self._hashed = threading.Condition()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)
            with self._hashed:
                self._pending -= memoryview(data).nbytes
                self._hashed.notify()

    def update(self, data: bytes | memoryview) -> None:
        if len(data) < BACKGROUND_HASH_BYTES and self._thread is None:
            self._hash.update(data)  # small sets: a thread would cost more than it saves
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()
        with self._hashed:
            self._hashed.wait_for(lambda: self._pending < self._limit)
            self._pending += memoryview(data).nbytes
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


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same values bit for bit (-0.0 is not 0.0), compared directly rather than by hashing."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8)))
