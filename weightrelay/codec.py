"""The one place where tensors cross between numpy and protobuf.

Framework code never touches protobuf: adapters speak numpy arrays in the canonical layout,
and this module turns them into `weightrelay.v1.Tensor` messages and weight streams, and
back, checking everything a receiver must check before it applies a weight set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from weightrelay.v1 import worker_pb2 as pb

#: Most tensor bytes in one stream message: 4 MiB less 4 KiB of room for the envelope,
#: so every message fits gRPC's default 4 MiB message limit.
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 4 * 1024
#: Fewest tensor bytes a GetWeights request may ask per message (smaller requests get this):
#: one small request must not make a worker send millions of messages.
MIN_CHUNK_BYTES = 64 * 1024
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
        return int(np.prod(self.shape, dtype=np.int64)) * _NUMPY_DTYPES[self.dtype].itemsize

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


def dtype_from_proto(value: int, tensor_name: str = "?") -> str:
    if value == pb.DTYPE_UNSPECIFIED or value not in pb.DType.values():
        raise TensorError(
            f"tensor {tensor_name}: dtype {value} is not set or unknown; "
            f"use one of {', '.join(n.upper() for n in SUPPORTED_DTYPES)}"
        )
    return pb.DType.Name(value).lower()


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


def _spec_from_proto(message: pb.Tensor | pb.TensorSpec) -> TensorSpec:
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
        digest.update(tensor_bytes(weights[name]))
    return digest.hexdigest()


def iter_weight_chunks(weights: Mapping[str, np.ndarray], max_chunk_bytes: int = 0) -> Iterator[pb.WeightsChunk]:
    """A weights stream: each tensor in pieces of at most `max_chunk_bytes`, then the digest."""
    chunk = MAX_CHUNK_BYTES if max_chunk_bytes <= 0 else min(max_chunk_bytes, MAX_CHUNK_BYTES)
    total = 0
    for name, array in weights.items():
        spec = TensorSpec.of(name, array)
        data = memoryview(tensor_bytes(array))
        total += len(data)
        offset = 0
        while True:
            piece = data[offset : offset + chunk]
            tensor = pb.Tensor(name=name, dtype=dtype_to_proto(spec.dtype), shape=spec.shape, data=bytes(piece))
            yield pb.WeightsChunk(piece=pb.TensorPiece(tensor=tensor, offset=offset))
            offset += len(piece)
            if offset >= len(data):
                break
    digest = pb.WeightsDigest(tensor_count=len(weights), total_bytes=total, sha256=weights_sha256(weights))
    yield pb.WeightsChunk(digest=digest)


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


def check_finite(name: str, array: np.ndarray) -> None:
    if dtype_name(array.dtype) not in _FLOAT_DTYPES:
        return
    bad = ~np.isfinite(array.astype(np.float32, copy=False))
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        raise TensorError(
            f"tensor {name}: {int(bad.sum())} non-finite value(s) (NaN or Inf), the first at index {first}"
        )


def assemble_weights(
    chunks: Iterable[pb.WeightsChunk], manifest: Mapping[str, TensorSpec] | None = None
) -> WeightSet:
    """Rebuild a weight set from a weights stream, checking it all along (see receive_weights)."""
    return receive_weights(chunks, manifest)[0]


def receive_weights(
    chunks: Iterable[pb.WeightsChunk], manifest: Mapping[str, TensorSpec] | None = None
) -> tuple[WeightSet, str]:
    """Rebuild a weight set from a weights stream, checking it all along; also return its verified checksum.

    With a `manifest` (what the receiver's model holds) every tensor is checked against it as
    soon as its first piece arrives, so a wrong stream is refused before it is buffered, and
    the finished set must hold exactly the manifest's tensors with finite values. The digest
    (count, bytes, checksum) is always checked. Raises TensorError; returns nothing partial.
    """
    specs: dict[str, TensorSpec] = {}
    buffers: dict[str, bytearray] = {}
    digest: pb.WeightsDigest | None = None
    for message in chunks:
        kind = message.WhichOneof("part")
        if digest is not None:
            raise TensorError("the weights stream goes on after its digest; the digest must be the last message")
        if kind == "digest":
            digest = message.digest
            continue
        if kind != "piece":
            raise TensorError("a weights stream message holds neither a tensor piece nor the digest")
        piece = message.piece
        spec = _spec_from_proto(piece.tensor)
        if spec.name not in specs:
            if piece.offset != 0:
                raise TensorError(f"tensor {spec.name}: first piece starts at offset {piece.offset}, expected 0")
            if manifest is not None:
                check_against_manifest(spec, manifest)
            specs[spec.name] = spec
            buffers[spec.name] = bytearray()
        elif specs[spec.name] != spec:
            raise TensorError(
                f"tensor {spec.name}: pieces disagree on dtype or shape "
                f"({specs[spec.name].dtype.upper()} {_fmt_shape(specs[spec.name].shape)} "
                f"then {spec.dtype.upper()} {_fmt_shape(spec.shape)})"
            )
        buffer = buffers[spec.name]
        if piece.offset != len(buffer):
            raise TensorError(
                f"tensor {spec.name}: piece at offset {piece.offset}, expected offset {len(buffer)} "
                "(pieces of a tensor must be consecutive and in order)"
            )
        if len(buffer) + len(piece.tensor.data) > spec.nbytes:
            raise TensorError(
                f"tensor {spec.name}: received more than {spec.nbytes} bytes "
                f"(shape {_fmt_shape(spec.shape)} of {spec.dtype.upper()})"
            )
        buffer += piece.tensor.data

    if digest is None:
        raise TensorError("the weights stream ended without its digest message")
    if manifest is not None:
        missing = [name for name in manifest if name not in specs]
        if missing:
            raise TensorError(f"missing tensor(s) {', '.join(missing)}; a weight set must hold all of {', '.join(manifest)}")
    weights = {name: array_from_bytes(specs[name], bytes(buffers[name])) for name in specs}
    total = sum(len(b) for b in buffers.values())
    if digest.tensor_count != len(weights) or digest.total_bytes != total:
        raise TensorError(
            f"digest says {digest.tensor_count} tensors and {digest.total_bytes} bytes, "
            f"the stream held {len(weights)} tensors and {total} bytes"
        )
    actual = weights_sha256(weights)
    if digest.sha256.lower() != actual:
        raise TensorError(f"checksum mismatch: the digest says sha256 {digest.sha256!r}, the tensors received hash to {actual!r}")
    if manifest is not None:
        for name, array in weights.items():
            check_finite(name, array)
    return weights, actual
