"""The one place where tensors cross between numpy and protobuf.

Framework code never touches protobuf: adapters speak numpy arrays in the canonical layout,
and this module turns them into `weightrelay.v1.Tensor` messages and weight streams, and
back, checking everything a receiver must check before it applies a weight set.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from weightrelay.v1 import worker_pb2 as pb

#: Most tensor bytes in one stream message: 4 MiB less 4 KiB of room for the envelope,
#: so every message fits gRPC's default 4 MiB message limit.
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 4 * 1024
#: Fewest tensor bytes a GetWeights request may ask per message (smaller requests get this):
#: one small request must not make a worker send millions of messages.
MIN_CHUNK_BYTES = 64 * 1024
#: Pieces at least this large are hashed on a thread beside the receive (see _BackgroundHash); below,
#: starting the thread costs more than hashing inline (a 1 MiB set's pieces are hashed in 0.6 ms).
_BACKGROUND_HASH_BYTES = 1024 * 1024
#: Longest tensor name accepted from the wire.
MAX_NAME_LENGTH = 256

WeightSet = dict[str, np.ndarray]

# dtype name (the proto enum name, lower-cased) -> little-endian numpy dtype
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "int8": np.dtype("i1"),
    "bool": np.dtype("?"),
}
_FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}
SUPPORTED_DTYPES = tuple(_NUMPY_DTYPES)


class TensorError(ValueError):
    """A tensor or weight stream is malformed or does not match what was expected.

    The message names the tensor and what was expected; servers map it to INVALID_ARGUMENT.
    """


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype name (e.g. "float32") and shape of one tensor; `buffer` marks state that is
    not trained by gradients but moves with the weights (BatchNorm running statistics)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    buffer: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _NUMPY_DTYPES[self.dtype].itemsize  # exact, and 20 times faster than np.prod

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> "TensorSpec":
        return cls(name, dtype_name(array.dtype), tuple(int(d) for d in array.shape))


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype ("float32", "bfloat16", ...)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return "bfloat16"
    for name, candidate in _NUMPY_DTYPES.items():
        if dtype.newbyteorder("<") == candidate or dtype == candidate:
            return name
    raise TensorError(f"dtype {dtype} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}")


def dtype_to_proto(name: str) -> int:
    return pb.DType.Value(name.upper())


_DTYPE_NAMES = {value: name.lower() for name, value in pb.DType.items() if value != pb.DTYPE_UNSPECIFIED}


def dtype_from_proto(value: int, tensor_name: str = "?") -> str:
    if value not in _DTYPE_NAMES:
        raise TensorError(
            f"tensor {tensor_name}: dtype {value} is not set or unknown; "
            f"use one of {', '.join(n.upper() for n in SUPPORTED_DTYPES)}"
        )
    return _DTYPE_NAMES[value]


def storage_dtype(name: str) -> np.dtype:
    """The little-endian dtype a tensor of wire dtype `name` is received into (bfloat16 as its 16-bit pattern)."""
    return np.dtype("<u2") if name == "bfloat16" else _NUMPY_DTYPES[name]


def tensor_bytes(array: np.ndarray) -> bytes:
    """Raw little-endian, C-order bytes of an array."""
    name = dtype_name(array.dtype)
    if name == "bfloat16":  # no byte-order variant: go through its 16-bit pattern
        return np.ascontiguousarray(array).view(np.uint16).astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name]).tobytes()


def array_from_bytes(spec: TensorSpec, data: bytes) -> np.ndarray:
    """A writable native-order array from raw bytes, after checking their length."""
    if len(data) != spec.nbytes:
        raise TensorError(
            f"tensor {spec.name}: received {len(data)} bytes, expected {spec.nbytes} "
            f"(shape {_fmt_shape(spec.shape)} of {spec.dtype.upper()})"
        )
    if spec.dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint16)
        return bits.view(ml_dtypes.bfloat16).reshape(spec.shape)
    le = _NUMPY_DTYPES[spec.dtype]
    return np.frombuffer(data, dtype=le).astype(le.newbyteorder("="), copy=True).reshape(spec.shape)


def to_proto(name: str, array: np.ndarray) -> pb.Tensor:
    spec = TensorSpec.of(name, array)
    return pb.Tensor(name=name, dtype=dtype_to_proto(spec.dtype), shape=spec.shape, data=tensor_bytes(array))


def _spec_from_proto(message: pb.Tensor | pb.TensorSpec | WirePiece) -> TensorSpec:
    name = message.name
    if not name:
        raise TensorError("a tensor has no name; every tensor needs one (e.g. fc1.weight)")
    if len(name) > MAX_NAME_LENGTH:
        raise TensorError(f"a tensor name of {len(name)} characters is longer than {MAX_NAME_LENGTH}: {name[:40]!r}...")
    dtype = dtype_from_proto(message.dtype, name)
    if any(d < 0 for d in message.shape):
        raise TensorError(f"tensor {name}: shape {_fmt_shape(message.shape)} has a negative dimension")
    return TensorSpec(name, dtype, tuple(int(d) for d in message.shape))


def from_proto(message: pb.Tensor) -> np.ndarray:
    return array_from_bytes(_spec_from_proto(message), message.data)


def spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=dtype_to_proto(spec.dtype), shape=spec.shape, buffer=spec.buffer)


def spec_from_proto(message: pb.TensorSpec) -> TensorSpec:
    spec = _spec_from_proto(message)
    return TensorSpec(spec.name, spec.dtype, spec.shape, buffer=message.buffer)


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """Checksum of a weight set, independent of tensor order (see worker.proto)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        spec = TensorSpec.of(name, weights[name])
        digest.update(name.encode())
        digest.update(b"\0" + spec.dtype.upper().encode() + b"\0")
        digest.update(",".join(str(d) for d in spec.shape).encode() + b"\0")
        digest.update(_le_view(weights[name]))  # no copy for little-endian, C-order arrays
    return digest.hexdigest()


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same values bit for bit (-0.0 is not 0.0); ten times faster than hashing."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


def _le_view(array: np.ndarray) -> memoryview:
    """The little-endian, C-order bytes of an array as a flat view (a copy only when the layout needs one)."""
    name = dtype_name(array.dtype)
    if name == "bfloat16":
        contiguous = np.ascontiguousarray(array).view(np.uint16).astype("<u2", copy=False)
    else:
        contiguous = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name])
    return memoryview(contiguous.reshape(-1)).cast("B")


def _chunk_bytes(max_chunk_bytes: int) -> int:
    return MAX_CHUNK_BYTES if max_chunk_bytes <= 0 else min(max_chunk_bytes, MAX_CHUNK_BYTES)


def _pieces(weights: Mapping[str, np.ndarray], max_chunk_bytes: int) -> Iterator[tuple[str, TensorSpec, int, memoryview]]:
    """(name, spec, offset, bytes) of each piece of a weights stream: tensors in name order, each in
    pieces of at most `max_chunk_bytes` (0: MAX_CHUNK_BYTES); an empty tensor is one empty piece.
    Each piece is cut from what `weights[name]` is when the piece is made (a worker's direct read
    swaps the model's memory for a copy mid-stream; see service.DirectRead)."""
    chunk = _chunk_bytes(max_chunk_bytes)
    for name in sorted(weights):
        array = weights[name]
        spec = TensorSpec.of(name, array)
        data = _le_view(array)
        offset = 0
        while True:
            if weights[name] is not array:
                array = weights[name]
                data = _le_view(array)
            piece = data[offset : offset + chunk]
            yield name, spec, offset, piece
            offset += len(piece)
            if offset >= len(data):
                break


def _digest(weights: Mapping[str, np.ndarray], sha256: str | None) -> pb.WeightsChunk:
    total = sum(array.nbytes for array in weights.values())
    return pb.WeightsChunk(digest=pb.WeightsDigest(tensor_count=len(weights), total_bytes=total, sha256=sha256 or weights_sha256(weights)))


def _packed(sized: Iterable[tuple[object, int]], limit: int) -> Iterator[list]:
    """Items grouped in order into messages of at most `limit` bytes (an item larger than that goes alone);
    `sized` gives each item with the bytes it adds to a message. The last group may be empty."""
    group: list = []
    size = 0
    for item, length in sized:
        if group and size + length > limit:
            yield group
            group, size = [], 0
        group.append(item)
        size += length
    yield group


def iter_weight_chunks(weights: Mapping[str, np.ndarray], max_chunk_bytes: int = 0, sha256: str | None = None,
                       pack: bool = False) -> Iterator[pb.WeightsChunk]:
    """A weights stream: each tensor in pieces of at most `max_chunk_bytes`, in name order (so a receiver
    can hash as the bytes arrive), then the digest. `sha256`: the set's checksum where the sender
    already knows it (a worker keeps its own), so it is not computed again. `pack`: a packed stream
    (worker.proto, WeightsChunk): pieces share messages, the digest rides in the last one.
    As messages, for tools and tests that change them; senders use `encode_weight_chunks`."""
    for message in encode_weight_chunks(weights, max_chunk_bytes, sha256, pack):
        yield pb.WeightsChunk.FromString(message)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_numbers(message, *names: str) -> tuple[int, ...]:
    return tuple(message.DESCRIPTOR.fields_by_name[name].number for name in names)


# The weights stream's field numbers, from the contract: written by encode_weight_chunks, read by decode_chunk.
_CHUNK_PIECE, _CHUNK_DIGEST, _CHUNK_PIECES = _field_numbers(pb.WeightsChunk, "piece", "digest", "pieces")
_PIECE_TENSOR, _PIECE_OFFSET = _field_numbers(pb.TensorPiece, "tensor", "offset")
_TENSOR_NAME, _TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_DATA = _field_numbers(pb.Tensor, "name", "dtype", "shape", "data")
_DIGEST_COUNT, _DIGEST_BYTES, _DIGEST_SHA = _field_numbers(pb.WeightsDigest, "tensor_count", "total_bytes", "sha256")
_VARINT, _LENGTH = 0, 2  # wire types


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


_PIECE_KEY, _PIECES_KEY, _DIGEST_KEY = (_key(field, _LENGTH) for field in (_CHUNK_PIECE, _CHUNK_PIECES, _CHUNK_DIGEST))
_TENSOR_KEY, _DATA_KEY, _OFFSET_KEY = _key(_PIECE_TENSOR, _LENGTH), _key(_TENSOR_DATA, _LENGTH), _key(_PIECE_OFFSET, _VARINT)


def holds_digest(message: bytes) -> bool:
    """Whether a serialized WeightsChunk holds the digest, which ends its stream, without decoding it: protobuf
    writes fields in number order, and the digest (2) comes before packed pieces (3). (A message from an
    encoder that writes another order is just not recognised; its stream then ends the usual way.)"""
    return message[:1] == _DIGEST_KEY


def until_digest(messages: Iterable[pb.WeightsChunk | StreamMessage]) -> Iterator[pb.WeightsChunk | StreamMessage]:
    """A weights stream up to its digest, without waiting for the stream's end after it (a receiver that
    pulls need not wait for the sender's trailing status: a few tenths of a millisecond a move)."""
    for message in messages:
        yield message
        if (message.digest is not None) if isinstance(message, StreamMessage) else message.WhichOneof("part") == "digest":
            return


@dataclass(frozen=True)
class WirePiece:
    """A TensorPiece as a receiver reads it: its tensor's header, the offset, and the bytes (from
    `decode_chunk`, a view into the received message: not a copy)."""

    name: str
    dtype: int  # the DType enum's value
    shape: tuple[int, ...]
    offset: int
    data: bytes | memoryview


@dataclass(frozen=True)
class WireDigest:
    tensor_count: int
    total_bytes: int
    sha256: str


@dataclass(frozen=True)
class StreamMessage:
    """One WeightsChunk as a receiver reads it: its pieces in the order they are taken (a packed message's
    `pieces`, then its `piece` part), and its digest if it holds that."""

    pieces: tuple[WirePiece, ...]
    digest: WireDigest | None


def stream_message(message: pb.WeightsChunk) -> StreamMessage:
    """A decoded WeightsChunk message as a StreamMessage."""
    part = message.WhichOneof("part")
    pieces = [*message.pieces, message.piece] if part == "piece" else list(message.pieces)
    digest = message.digest if part == "digest" else None
    return StreamMessage(
        tuple(WirePiece(p.tensor.name, p.tensor.dtype, tuple(p.tensor.shape), p.offset, p.tensor.data) for p in pieces),
        None if digest is None else WireDigest(digest.tensor_count, digest.total_bytes, digest.sha256),
    )


def decode_chunk(data: bytes) -> StreamMessage:
    """A serialized WeightsChunk, decoded without copying its tensor bytes: protobuf's parser copies each
    piece's data twice (into the message, then out as `bytes`), a fifth of a receiving worker's work on
    a large set. Messages laid out as protobuf writes them (fields in number order, each once, packed
    pieces repeated; no unknown fields) are read here; any other bytes go to protobuf's own parser, so
    both read every input alike (tests/unit/test_codec.py). Raises protobuf's DecodeError for bad bytes."""
    try:
        return _decode_chunk_fast(data)
    except _NotFastPath:
        return stream_message(pb.WeightsChunk.FromString(data))


class _NotFastPath(Exception):
    """Bytes decode_chunk leaves to protobuf's parser."""


# field number -> wire type, per message (decode_chunk)
_CHUNK_LAYOUT = {_CHUNK_PIECE: _LENGTH, _CHUNK_DIGEST: _LENGTH, _CHUNK_PIECES: _LENGTH}
_PIECE_LAYOUT = {_PIECE_TENSOR: _LENGTH, _PIECE_OFFSET: _VARINT}
_TENSOR_LAYOUT = {_TENSOR_NAME: _LENGTH, _TENSOR_DTYPE: _VARINT, _TENSOR_SHAPE: _LENGTH, _TENSOR_DATA: _LENGTH}
_DIGEST_LAYOUT = {_DIGEST_COUNT: _VARINT, _DIGEST_BYTES: _VARINT, _DIGEST_SHA: _LENGTH}


def _varint_at(data: bytes, position: int, end: int) -> tuple[int, int]:
    """The varint at `position` (at most 10 bytes, below 2**64) and the position after it."""
    value = shift = 0
    while position < end and shift < 70:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                raise _NotFastPath
            return value, position
        shift += 7
    raise _NotFastPath


def _fields(data: bytes, position: int, end: int, layout: Mapping[int, int], repeated: int = 0) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """(number, value) of each field of the message in data[position:end]: a varint's value, or a
    length-delimited field's (start, end). Fields must have `layout`'s wire types and come in rising
    number order, each once (`repeated` may come again)."""
    last = 0
    while position < end:
        key, position = _varint_at(data, position, end)
        number, wire = key >> 3, key & 7
        if layout.get(number) != wire or number < last or (number == last and number != repeated):
            raise _NotFastPath
        last = number
        if wire == _VARINT:
            value, position = _varint_at(data, position, end)
            yield number, value
        else:
            length, position = _varint_at(data, position, end)
            if length > end - position:
                raise _NotFastPath
            yield number, (position, position + length)
            position += length


def _text(data: bytes, span: tuple[int, int]) -> str:
    try:
        return str(data[span[0] : span[1]], "utf-8")
    except UnicodeDecodeError:
        raise _NotFastPath from None


def _decode_chunk_fast(data: bytes) -> StreamMessage:
    view = memoryview(data)
    pieces: list[WirePiece] = []
    piece: WirePiece | None = None
    digest: WireDigest | None = None
    for number, span in _fields(data, 0, len(data), _CHUNK_LAYOUT, repeated=_CHUNK_PIECES):
        if number == _CHUNK_DIGEST:
            digest = _decode_digest_fast(data, span)
        elif number == _CHUNK_PIECES:
            pieces.append(_decode_piece_fast(data, view, span))
        else:
            piece = _decode_piece_fast(data, view, span)
    if piece is not None:
        if digest is not None:  # the oneof set twice (protobuf keeps the later)
            raise _NotFastPath
        pieces.append(piece)
    return StreamMessage(tuple(pieces), digest)


def _decode_piece_fast(data: bytes, view: memoryview, span: tuple[int, int]) -> WirePiece:
    name, dtype, shape, payload, offset = "", 0, (), b"", 0
    for number, value in _fields(data, *span, _PIECE_LAYOUT):
        if number == _PIECE_OFFSET:
            offset = value
            continue
        for field, content in _fields(data, *value, _TENSOR_LAYOUT):
            if field == _TENSOR_NAME:
                name = _text(data, content)
            elif field == _TENSOR_DTYPE:
                if content >= 1 << 31:  # an enum is an int32: protobuf reads larger varints its own way
                    raise _NotFastPath
                dtype = content
            elif field == _TENSOR_SHAPE:  # packed int64s
                dims, position = [], content[0]
                while position < content[1]:
                    dim, position = _varint_at(data, position, content[1])
                    dims.append(dim - (1 << 64) if dim >> 63 else dim)
                shape = tuple(dims)
            else:
                payload = view[content[0] : content[1]]
    return WirePiece(name, dtype, shape, offset, payload)


def _decode_digest_fast(data: bytes, span: tuple[int, int]) -> WireDigest:
    count, total, sha = 0, 0, ""
    for number, value in _fields(data, *span, _DIGEST_LAYOUT):
        if number == _DIGEST_COUNT:
            if value >> 32:  # a uint32: protobuf reads larger varints its own way
                raise _NotFastPath
            count = value
        elif number == _DIGEST_BYTES:
            total = value
        else:
            sha = _text(data, value)
    return WireDigest(count, total, sha)


def _encoded_pieces(weights: Mapping[str, np.ndarray], max_chunk_bytes: int) -> Iterator[tuple[tuple, int]]:
    """Each piece as a serialized TensorPiece in parts (the tensor's data is one of them, uncopied), with its length."""
    for name, spec, offset, piece in _pieces(weights, max_chunk_bytes):
        head = pb.Tensor(name=name, dtype=dtype_to_proto(spec.dtype), shape=spec.shape).SerializeToString()
        data_head = _DATA_KEY + _varint(len(piece)) if len(piece) else b""  # proto3 leaves empty bytes out
        tensor_length = len(head) + len(data_head) + len(piece)
        tail = _OFFSET_KEY + _varint(offset) if offset else b""
        parts = (_TENSOR_KEY, _varint(tensor_length), head, data_head, piece, tail)
        yield parts, sum(len(part) for part in parts)


def encode_weight_chunks(weights: Mapping[str, np.ndarray], max_chunk_bytes: int = 0, sha256: str | None = None,
                         pack: bool = False) -> Iterator[bytes]:
    """A weights stream (see iter_weight_chunks) as the bytes protobuf would write for its messages, made
    with one copy of the tensor data per message instead of three (bytes, message, serialization)."""
    pieces = _encoded_pieces(weights, max_chunk_bytes)
    if not pack:
        for parts, length in pieces:
            yield b"".join((_PIECE_KEY, _varint(length), *parts))
        yield _digest(weights, sha256).SerializeToString()
        return
    sized = (((_PIECES_KEY, _varint(length), *parts), len(_PIECES_KEY) + len(_varint(length)) + length) for parts, length in pieces)
    groups = _packed(sized, _chunk_bytes(max_chunk_bytes))
    previous = next(groups)
    for group in groups:
        yield b"".join(part for item in previous for part in item)
        previous = group
    # the digest (field 2) before the last pieces (field 3), the order protobuf writes them in
    yield b"".join((_digest(weights, sha256).SerializeToString(), *(part for item in previous for part in item)))


def check_against_manifest(spec: TensorSpec, manifest: Mapping[str, TensorSpec]) -> None:
    """Raise TensorError unless `spec` names a tensor of the manifest with its dtype and shape."""
    expected = manifest.get(spec.name)
    if expected is None:
        raise TensorError(f"unexpected tensor {spec.name}; expected tensors: {', '.join(manifest)}")
    if spec.shape != expected.shape:
        raise TensorError(
            f"tensor {spec.name}: expected shape {_fmt_shape(expected.shape)}, got {_fmt_shape(spec.shape)}"
        )
    if spec.dtype != expected.dtype:
        raise TensorError(f"tensor {spec.name}: expected dtype {expected.dtype.upper()}, got {spec.dtype.upper()}")


#: Elements checked at a time by check_finite.
_FINITE_BLOCK = 1 << 20


def check_finite(name: str, array: np.ndarray) -> None:
    kind = dtype_name(array.dtype)
    if kind not in _FLOAT_DTYPES:
        return
    values = array if kind in ("float32", "float64") else array.astype(np.float32)
    flat = values.reshape(-1)
    # The common case, all finite: checked a block at a time into one small mask, because a mask
    # of the whole tensor is fresh memory (slow to touch) and as large as a quarter of it.
    mask = np.empty(min(len(flat), _FINITE_BLOCK), dtype=bool)
    blocks = (flat[i : i + _FINITE_BLOCK] for i in range(0, len(flat), _FINITE_BLOCK))
    if all(np.isfinite(block, out=mask[: len(block)]).all() for block in blocks):
        return
    bad = ~np.isfinite(values)
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        raise TensorError(
            f"tensor {name}: {int(bad.sum())} non-finite value(s) (NaN or Inf), the first at index {first}"
        )


def assemble_weights(
    chunks: Iterable[pb.WeightsChunk | StreamMessage], manifest: Mapping[str, TensorSpec] | None = None
) -> WeightSet:
    """Rebuild a weight set from a weights stream, checking it all along (see receive_weights)."""
    return receive_weights(chunks, manifest)[0]


def _tensor_header(spec: TensorSpec) -> bytes:
    """What the set checksum hashes before a tensor's bytes (see worker.proto)."""
    return spec.name.encode() + b"\0" + spec.dtype.upper().encode() + b"\0" + ",".join(str(d) for d in spec.shape).encode() + b"\0"


def _empty(spec: TensorSpec) -> np.ndarray:
    return np.empty(spec.shape, dtype=storage_dtype(spec.dtype))


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


def receive_weights(
    chunks: Iterable[pb.WeightsChunk | StreamMessage], manifest: Mapping[str, TensorSpec] | None = None,
    allocate: Callable[[TensorSpec], np.ndarray] = _empty,
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
    buffers it reuses (weightrelay.buffers).
    """
    hasher = _BackgroundHash()
    try:
        return _receive(chunks, manifest, allocate, hasher)
    finally:
        hasher.close()  # nothing reads the arrays once this returns


def _receive(chunks: Iterable[pb.WeightsChunk], manifest: Mapping[str, TensorSpec] | None,
             allocate: Callable[[TensorSpec], np.ndarray], hasher: _BackgroundHash) -> tuple[WeightSet, str]:
    specs: dict[str, TensorSpec] = {}
    arrays: dict[str, np.ndarray] = {}
    views: dict[str, memoryview] = {}
    filled: dict[str, int] = {}
    digest: WireDigest | None = None
    in_order = True
    last_name = ""

    def take(piece: WirePiece) -> None:
        nonlocal in_order, last_name
        spec = _spec_from_proto(piece)
        if spec.name not in specs:
            if piece.offset != 0:
                raise TensorError(f"tensor {spec.name}: first piece starts at offset {piece.offset}, expected 0")
            if manifest is not None:
                check_against_manifest(spec, manifest)
            if manifest is None and spec.nbytes > (1 << 36):
                raise TensorError(f"tensor {spec.name}: shape {_fmt_shape(spec.shape)} is larger than 64 GiB")
            specs[spec.name] = spec
            arrays[spec.name] = allocate(spec)
            views[spec.name] = memoryview(arrays[spec.name].reshape(-1)).cast("B")
            filled[spec.name] = 0
            if last_name and (spec.name <= last_name or filled[last_name] != specs[last_name].nbytes):
                in_order = False  # not in name order, or the previous tensor is not complete yet
            last_name = spec.name
            if in_order:
                hasher.update(_tensor_header(spec))
        elif specs[spec.name] != spec:
            raise TensorError(
                f"tensor {spec.name}: pieces disagree on dtype or shape "
                f"({specs[spec.name].dtype.upper()} {_fmt_shape(specs[spec.name].shape)} "
                f"then {spec.dtype.upper()} {_fmt_shape(spec.shape)})"
            )
        elif spec.name != last_name:
            in_order = False  # pieces of tensors interleave
        done = filled[spec.name]
        if piece.offset != done:
            raise TensorError(
                f"tensor {spec.name}: piece at offset {piece.offset}, expected offset {done} "
                "(pieces of a tensor must be consecutive and in order)"
            )
        data = piece.data
        if done + len(data) > spec.nbytes:
            raise TensorError(
                f"tensor {spec.name}: received more than {spec.nbytes} bytes "
                f"(shape {_fmt_shape(spec.shape)} of {spec.dtype.upper()})"
            )
        views[spec.name][done : done + len(data)] = data
        filled[spec.name] = done + len(data)
        if in_order:
            hasher.update(views[spec.name][done : done + len(data)])

    for message in chunks:
        if digest is not None:
            raise TensorError("the weights stream goes on after its digest; the digest must be the last message")
        if not isinstance(message, StreamMessage):
            message = stream_message(message)
        if not message.pieces and message.digest is None:
            raise TensorError("a weights stream message holds neither a tensor piece nor the digest")
        for piece in message.pieces:
            take(piece)
        digest = message.digest

    if digest is None:
        raise TensorError("the weights stream ended without its digest message")
    if manifest is not None:
        missing = [name for name in manifest if name not in specs]
        if missing:
            raise TensorError(f"missing tensor(s) {', '.join(missing)}; a weight set must hold all of {', '.join(manifest)}")
    for name, spec in specs.items():
        if filled[name] != spec.nbytes:
            raise TensorError(
                f"tensor {name}: received {filled[name]} bytes, expected {spec.nbytes} "
                f"(shape {_fmt_shape(spec.shape)} of {spec.dtype.upper()})"
            )
    total = sum(filled.values())
    if digest.tensor_count != len(specs) or digest.total_bytes != total:
        raise TensorError(
            f"digest says {digest.tensor_count} tensors and {digest.total_bytes} bytes, "
            f"the stream held {len(specs)} tensors and {total} bytes"
        )
    weights = {name: native_view(specs[name], arrays[name]) for name in specs}
    not_finite: TensorError | None = None
    if manifest is not None:
        try:  # while the hashing thread catches up with the last pieces (a large set's last 0.1-0.2 s)
            for name, array in weights.items():
                check_finite(name, array)
        except TensorError as exc:
            not_finite = exc
    actual = hasher.hexdigest() if in_order else weights_sha256(weights)
    if digest.sha256.lower() != actual:
        raise TensorError(f"checksum mismatch: the digest says sha256 {digest.sha256!r}, the tensors received hash to {actual!r}")
    if not_finite is not None:  # reported after the checksum: a damaged stream is named as such first
        raise not_finite
    return weights, actual


def native_view(spec: TensorSpec, received: np.ndarray) -> np.ndarray:
    """The received little-endian array in its real dtype and native byte order (no copy on little-endian machines)."""
    if spec.dtype == "bfloat16":
        return received.astype(np.uint16, copy=False).view(ml_dtypes.bfloat16)
    return received.astype(received.dtype.newbyteorder("="), copy=False)
