"""The weights stream on the wire (worker.proto, WeightsChunk), written and read by hand for the
fast path: `encode_weight_chunks` writes the bytes protobuf would write without copying tensor data
into messages, `decode_chunk` reads them into views of the received bytes (anything it does not
recognise goes to protobuf's parser, so both read every input alike). Also the records a receiver
reads a stream as (`StreamMessage`, `WirePiece`, `WireDigest`).

A reader that holds some matrices transposed names them (GetWeightsRequest.transposed); a sender that holds
one of them so too sends it as it is (`Tensor.transposed`, `sends_transposed`), and the digest then carries
the checksum of the stream as sent beside the set's (`stream_sha256`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from weightrelay.codec.checksum import BackgroundHash, stream_header, weights_sha256
from weightrelay.codec.tensors import TensorSpec, dtype_name, dtype_to_proto, little_endian_view
from weightrelay.transpose import rows_into
from weightrelay.v1 import worker_pb2 as pb

#: Most tensor bytes in one stream message: 4 MiB less 4 KiB of room for the envelope,
#: so every message fits gRPC's default 4 MiB message limit.
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 4 * 1024
#: Fewest tensor bytes a GetWeights request may ask per message (smaller requests get this):
#: one small request must not make a worker send millions of messages.
MIN_CHUNK_BYTES = 64 * 1024


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
_TENSOR_NAME, _TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_DATA, _TENSOR_TRANSPOSED = _field_numbers(
    pb.Tensor, "name", "dtype", "shape", "data", "transposed")
_DIGEST_COUNT, _DIGEST_BYTES, _DIGEST_SHA, _DIGEST_STREAM_SHA = _field_numbers(pb.WeightsDigest, "tensor_count", "total_bytes", "sha256", "stream_sha256")
_VARINT, _LENGTH = 0, 2  # wire types


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


_PIECE_KEY, _PIECES_KEY, _DIGEST_KEY = (_key(field, _LENGTH) for field in (_CHUNK_PIECE, _CHUNK_PIECES, _CHUNK_DIGEST))
_TENSOR_KEY, _DATA_KEY, _OFFSET_KEY = _key(_PIECE_TENSOR, _LENGTH), _key(_TENSOR_DATA, _LENGTH), _key(_PIECE_OFFSET, _VARINT)
_TRANSPOSED_FIELD = _key(_TENSOR_TRANSPOSED, _VARINT) + b"\x01"  # Tensor.transposed = true


@dataclass(frozen=True)
class WirePiece:
    """A TensorPiece as a receiver reads it: its tensor's header, the offset, and the bytes (from
    `decode_chunk`, a view into the received message: not a copy)."""

    name: str
    dtype: int  # the DType enum's value
    shape: tuple[int, ...]
    offset: int
    data: bytes | memoryview
    transposed: bool = False  # the bytes are the matrix's transpose (Tensor.transposed)


@dataclass(frozen=True)
class WireDigest:
    tensor_count: int
    total_bytes: int
    sha256: str
    stream_sha256: str = ""  # the stream's own checksum, where it sends a tensor transposed


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
        tuple(WirePiece(p.tensor.name, p.tensor.dtype, tuple(p.tensor.shape), p.offset, p.tensor.data, p.tensor.transposed) for p in pieces),
        None if digest is None else WireDigest(digest.tensor_count, digest.total_bytes, digest.sha256, digest.stream_sha256),
    )


def _chunk_bytes(max_chunk_bytes: int) -> int:
    return MAX_CHUNK_BYTES if max_chunk_bytes <= 0 else min(max_chunk_bytes, MAX_CHUNK_BYTES)


#: The most bytes of a band a transposed matrix is converted in as it is sent (_band_pieces), and of the bands a
#: receiver converts in (weightrelay.conversion). 504 rows of a 16384-wide float32 matrix: measured on this
#: project's machine, bands of about 512 rows transpose a fifth to a third faster than bands of 256 (`python -m
#: bench.transpose --band-mib`, bench/README.md), and a band below buffers.HEAP_ALLOCATIONS_UP_TO comes from the
#: heap, where the next band reuses its memory, instead of fresh pages.
BAND_BYTES = 63 * 512 * 1024


def _banded(array: np.ndarray) -> bool:
    """Whether `array` is sent band by band (_band_pieces): a non-empty 2-D matrix whose transpose is
    C-contiguous (a framework's [in, out] kernel seen as the canonical [out, in]), little-endian."""
    return (array.ndim == 2 and array.size > 0 and not array.flags.c_contiguous and array.T.flags.c_contiguous
            and array.dtype.str[0] in "<|" and dtype_name(array.dtype) != "bfloat16")


def sends_transposed(weights: Mapping[str, np.ndarray], requested: Iterable[str]) -> frozenset[str]:
    """Of the matrices a reader asked for transposed (GetWeightsRequest.transposed), those `weights` holds
    transposed too (_banded: a framework's [in, out] kernel seen as [out, in]), which a stream then sends as
    they are held: no conversion on either side."""
    return frozenset(name for name in requested if name in weights and _banded(weights[name]))


def _rows_per_piece(row_bytes: int, chunk: int) -> int:
    return max(1, chunk // row_bytes)


def _rows_in_pieces(data: memoryview, row_bytes: int, chunk: int) -> Iterator[memoryview]:
    """`data` (whole rows) in pieces of as many whole rows as fit `chunk` (a row longer than that is split)."""
    step = _rows_per_piece(row_bytes, chunk) * row_bytes
    for start in range(0, len(data), step):
        unit = data[start : start + step]
        for cut in range(0, len(unit), chunk):
            yield unit[cut : cut + chunk]


def _transposed_pieces(weights: Mapping[str, np.ndarray], name: str, chunk: int) -> Iterator[memoryview]:
    """The bytes of matrix `name` transposed ([in, out], as a framework holding it so holds it), in pieces of
    whole rows: straight from its memory, or where `weights[name]` has become a contiguous copy meanwhile
    (store.DirectRead) from that copy, a piece's rows at a time."""
    columns, rows = weights[name].shape
    row_bytes = columns * weights[name].dtype.itemsize
    per_piece = _rows_per_piece(row_bytes, chunk)
    for row in range(0, rows, per_piece):
        array = weights[name]
        stop = min(rows, row + per_piece)
        held = array.T[row:stop] if array.T.flags.c_contiguous else np.ascontiguousarray(array[:, row:stop].T)
        yield from _rows_in_pieces(memoryview(held.reshape(-1)).cast("B"), row_bytes, chunk)


def _band_pieces(weights: Mapping[str, np.ndarray], name: str, spec: TensorSpec, chunk: int) -> Iterator[tuple[str, TensorSpec, int, memoryview]]:
    """The pieces of a _banded tensor: as many whole rows as fit a piece (a row longer than a piece is
    split), cut from bands of about BAND_BYTES, each transposed from the matrix's memory as the stream
    reaches it: the conversion runs beside the transfer, and no copy of the whole matrix is made. A
    band reads whole pages of every row of the matrix's memory (fewer, larger transposes than one
    per piece)."""
    rows, columns = spec.shape
    row_bytes = columns * np.dtype(weights[name].dtype).itemsize
    per_piece = _rows_per_piece(row_bytes, chunk)
    per_band = per_piece * max(1, BAND_BYTES // (per_piece * row_bytes))
    offset = 0
    for row in range(0, rows, per_band):
        stop = min(rows, row + per_band)
        array = weights[name]  # may have become a contiguous copy meanwhile (store.DirectRead)
        band = np.empty((stop - row, columns), array.dtype)
        if _banded(array):
            rows_into(array, row, stop, band, threads=1)  # the stream's other work keeps the other cores busy
        else:
            np.copyto(band, array[row:stop])
        for piece in _rows_in_pieces(memoryview(band.reshape(-1)).cast("B"), row_bytes, chunk):
            yield name, spec, offset, piece
            offset += len(piece)


def _pieces(weights: Mapping[str, np.ndarray], max_chunk_bytes: int,
            transposed: frozenset[str] = frozenset()) -> Iterator[tuple[str, TensorSpec, int, memoryview]]:
    """(name, spec, offset, bytes) of each piece of a weights stream: tensors in name order, each in
    pieces of at most `max_chunk_bytes` (0: MAX_CHUNK_BYTES); an empty tensor is one empty piece.
    Each piece is cut from what `weights[name]` is when the piece is made (a worker's direct read
    swaps the model's memory for a copy mid-stream; see store.DirectRead); a matrix of `transposed`
    goes out as its transpose (_transposed_pieces), another matrix whose transpose is contiguous in
    bands of whole rows (_band_pieces)."""
    chunk = _chunk_bytes(max_chunk_bytes)
    for name in sorted(weights):
        array = weights[name]
        spec = TensorSpec.of(name, array)
        if name in transposed:
            offset = 0
            for piece in _transposed_pieces(weights, name, chunk):
                yield name, spec, offset, piece
                offset += len(piece)
            continue
        if _banded(array):
            yield from _band_pieces(weights, name, spec, chunk)
            continue
        data = little_endian_view(array)
        offset = 0
        while True:
            if weights[name] is not array:
                array = weights[name]
                data = little_endian_view(array)
            piece = data[offset : offset + chunk]
            yield name, spec, offset, piece
            offset += len(piece)
            if offset >= len(data):
                break


def _digest(weights: Mapping[str, np.ndarray], sha256: str | None, stream_sha256: str = "") -> bytes:
    total = sum(array.nbytes for array in weights.values())
    digest = pb.WeightsDigest(tensor_count=len(weights), total_bytes=total, sha256=sha256 or weights_sha256(weights), stream_sha256=stream_sha256)
    return pb.WeightsChunk(digest=digest).SerializeToString()


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
                       pack: bool = False, transposed: Iterable[str] = ()) -> Iterator[pb.WeightsChunk]:
    """A weights stream: each tensor in pieces of at most `max_chunk_bytes`, in name order (so a receiver
    can hash as the bytes arrive), then the digest. `sha256`: the set's checksum where the sender
    already knows it (a worker keeps its own), so it is not computed again. `pack`: a packed stream
    (worker.proto, WeightsChunk): pieces share messages, the digest rides in the last one.
    `transposed`: matrices to send transposed where `weights` holds them so (sends_transposed).
    As messages, for tools and tests that change them; senders use `encode_weight_chunks`."""
    for message in encode_weight_chunks(weights, max_chunk_bytes, sha256, pack, transposed):
        yield pb.WeightsChunk.FromString(message)



@dataclass(frozen=True)
class _Encoded:
    """A piece as a serialized TensorPiece in parts, the tensor's data one of them (uncopied); for the
    stream's own checksum, the data's place among the parts and what is hashed before it."""

    parts: tuple
    payload: int  # the index of the data in `parts`
    header: bytes  # the tensor's stream header at its first piece, else b""

    def framed(self, key: bytes) -> "_Encoded":
        """The piece as a field `key` of a WeightsChunk."""
        return _Encoded((key, _varint(self.size), *self.parts), self.payload + 2, self.header)

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)


def _encoded_pieces(weights: Mapping[str, np.ndarray], max_chunk_bytes: int, transposed: frozenset[str]) -> Iterator[_Encoded]:
    """Each piece of the stream as a serialized TensorPiece."""
    for name, spec, offset, piece in _pieces(weights, max_chunk_bytes, transposed):
        flipped = name in transposed
        head = pb.Tensor(name=name, dtype=dtype_to_proto(spec.dtype), shape=spec.shape).SerializeToString()
        data_head = _DATA_KEY + _varint(len(piece)) if len(piece) else b""  # proto3 leaves empty bytes out
        flag = _TRANSPOSED_FIELD if flipped else b""  # after the data: protobuf writes fields in number order
        tensor_length = len(head) + len(data_head) + len(piece) + len(flag)
        tail = _OFFSET_KEY + _varint(offset) if offset else b""
        yield _Encoded((_TENSOR_KEY, _varint(tensor_length), head, data_head, piece, flag, tail), 4,
                       stream_header(spec, flipped) if offset == 0 else b"")


def _hash_payloads(hasher: BackgroundHash, items: Iterable[_Encoded], message: bytes | None = None) -> None:
    """Feed the stream's own checksum the pieces of one message: from `message`, the items joined (immutable
    bytes, so the hashing thread may read them after the model's memory has been let go); without it, from the
    parts themselves (the caller waits for the checksum before it lets the memory go)."""
    view = memoryview(message) if message is not None else None
    position = 0
    for item in items:
        if item.header:
            hasher.update(item.header)
        for index, part in enumerate(item.parts):
            if index == item.payload:
                hasher.update(view[position : position + len(part)] if view is not None else part)
            position += len(part)


def encode_weight_chunks(weights: Mapping[str, np.ndarray], max_chunk_bytes: int = 0, sha256: str | None = None,
                         pack: bool = False, transposed: Iterable[str] = (), stream_sha256: str | None = None,
                         hashed: Callable[[str], None] | None = None) -> Iterator[bytes]:
    """A weights stream (see iter_weight_chunks) as the bytes protobuf would write for its messages, made
    with one copy of the tensor data per message instead of three (bytes, message, serialization).

    `transposed`: matrices to send as `weights` holds them where it holds them transposed (sends_transposed);
    the digest then carries the stream's own checksum: `stream_sha256` where the sender knows it already (a
    worker keeps it), else computed from the messages as they are made and handed to `hashed` at the end."""
    flipped = sends_transposed(weights, transposed)
    hasher = BackgroundHash() if flipped and not stream_sha256 else None
    try:
        yield from _encoded_stream(weights, max_chunk_bytes, sha256, pack, flipped, stream_sha256 or "", hasher, hashed)
    finally:
        if hasher is not None:
            hasher.close()


def _encoded_stream(weights: Mapping[str, np.ndarray], max_chunk_bytes: int, sha256: str | None, pack: bool, flipped: frozenset[str],
                    stream_sha256: str, hasher: BackgroundHash | None, hashed: Callable[[str], None] | None) -> Iterator[bytes]:
    def digest() -> bytes:
        nonlocal stream_sha256
        if hasher is not None:
            stream_sha256 = hasher.hexdigest()
            if hashed is not None:
                hashed(stream_sha256)
        return _digest(weights, sha256, stream_sha256)

    pieces = _encoded_pieces(weights, max_chunk_bytes, flipped)
    if not pack:
        for item in pieces:
            item = item.framed(_PIECE_KEY)
            message = b"".join(item.parts)
            if hasher is not None:
                _hash_payloads(hasher, (item,), message)
            yield message
        yield digest()
        return
    sized = ((framed, framed.size) for framed in (item.framed(_PIECES_KEY) for item in pieces))
    groups = _packed(sized, _chunk_bytes(max_chunk_bytes))
    previous = next(groups)
    for group in groups:
        message = b"".join(part for item in previous for part in item.parts)
        if hasher is not None:
            _hash_payloads(hasher, previous, message)
        yield message
        previous = group
    if hasher is not None:
        _hash_payloads(hasher, previous)  # before the digest that holds the checksum
    # the digest (field 2) before the last pieces (field 3), the order protobuf writes them in
    yield b"".join((digest(), *(part for item in previous for part in item.parts)))


def holds_digest(message: bytes) -> bool:
    """Whether a serialized WeightsChunk holds the digest, which ends its stream, without decoding it: protobuf
    writes fields in number order, and the digest (2) comes before packed pieces (3). (A message from an
    encoder that writes another order is just not recognised; its stream then ends the usual way.)"""
    return message[:1] == _DIGEST_KEY


def until_digest(messages: Iterable[pb.WeightsChunk | StreamMessage]) -> Iterator[pb.WeightsChunk | StreamMessage]:
    """A weights stream up to its digest, without waiting for the stream's end after it (a receiver that
    pulls need not wait for the sender's trailing status)."""
    for message in messages:
        yield message
        if (message.digest is not None) if isinstance(message, StreamMessage) else message.WhichOneof("part") == "digest":
            return


def decode_chunk(data: bytes) -> StreamMessage:
    """A serialized WeightsChunk, decoded without copying its tensor bytes (protobuf's parser copies each
    piece's data twice: into the message, then out as `bytes`). Messages laid out as protobuf writes
    them (fields in number order, each once, packed pieces repeated; no unknown fields) are read here;
    any other bytes go to protobuf's own parser, so both read every input alike
    (tests/unit/test_codec.py). Raises protobuf's DecodeError for bad bytes."""
    try:
        return _decode_chunk_fast(data)
    except _NotFastPath:
        return stream_message(pb.WeightsChunk.FromString(data))


class _NotFastPath(Exception):
    """Bytes decode_chunk leaves to protobuf's parser."""


# field number -> wire type, per message (decode_chunk)
_CHUNK_LAYOUT = {_CHUNK_PIECE: _LENGTH, _CHUNK_DIGEST: _LENGTH, _CHUNK_PIECES: _LENGTH}
_PIECE_LAYOUT = {_PIECE_TENSOR: _LENGTH, _PIECE_OFFSET: _VARINT}
_TENSOR_LAYOUT = {_TENSOR_NAME: _LENGTH, _TENSOR_DTYPE: _VARINT, _TENSOR_SHAPE: _LENGTH, _TENSOR_DATA: _LENGTH, _TENSOR_TRANSPOSED: _VARINT}
_DIGEST_LAYOUT = {_DIGEST_COUNT: _VARINT, _DIGEST_BYTES: _VARINT, _DIGEST_SHA: _LENGTH, _DIGEST_STREAM_SHA: _LENGTH}


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
    name, dtype, shape, payload, offset, transposed = "", 0, (), b"", 0, False
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
            elif field == _TENSOR_TRANSPOSED:
                transposed = content != 0  # a bool: any varint but 0 is true, as protobuf reads it
            else:
                payload = view[content[0] : content[1]]
    return WirePiece(name, dtype, shape, offset, payload, transposed)


def _decode_digest_fast(data: bytes, span: tuple[int, int]) -> WireDigest:
    count, total, sha, stream_sha = 0, 0, "", ""
    for number, value in _fields(data, *span, _DIGEST_LAYOUT):
        if number == _DIGEST_COUNT:
            if value >> 32:  # a uint32: protobuf reads larger varints its own way
                raise _NotFastPath
            count = value
        elif number == _DIGEST_BYTES:
            total = value
        elif number == _DIGEST_SHA:
            sha = _text(data, value)
        else:
            stream_sha = _text(data, value)
    return WireDigest(count, total, sha, stream_sha)
