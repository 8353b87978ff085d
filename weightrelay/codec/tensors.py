"""One tensor between numpy and protobuf: the dtype map, `TensorSpec`, the `weightrelay.v1.Tensor`
and `TensorSpec` conversions, and the checks a receiver makes on a tensor (header, manifest,
finite values). Pure functions, no I/O; `x_to_proto` and `x_from_proto` undo each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import ml_dtypes
import numpy as np

from weightrelay.v1 import worker_pb2 as pb

if TYPE_CHECKING:
    from weightrelay.codec.wire import WirePiece

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
        return math.prod(self.shape) * _NUMPY_DTYPES[self.dtype].itemsize  # exact Python ints, no numpy overflow

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> "TensorSpec":
        return cls(name, dtype_name(array.dtype), tuple(int(d) for d in array.shape))


def fmt_shape(shape: Iterable[int]) -> str:
    """A shape as error messages write it: "[128, 784]"."""
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


def native_view(spec: TensorSpec, received: np.ndarray) -> np.ndarray:
    """The array received in `storage_dtype` in its real dtype and native byte order (no copy on little-endian machines)."""
    if spec.dtype == "bfloat16":
        return received.astype(np.uint16, copy=False).view(ml_dtypes.bfloat16)
    return received.astype(received.dtype.newbyteorder("="), copy=False)


def little_endian_view(array: np.ndarray) -> memoryview:
    """The little-endian, C-order bytes of an array as a flat view (a copy only when the layout needs one)."""
    name = dtype_name(array.dtype)
    if name == "bfloat16":  # no byte-order variant: go through its 16-bit pattern
        contiguous = np.ascontiguousarray(array).view(np.uint16).astype("<u2", copy=False)
    else:
        contiguous = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name])
    return memoryview(contiguous.reshape(-1)).cast("B")


def tensor_bytes(array: np.ndarray) -> bytes:
    """Raw little-endian, C-order bytes of an array."""
    return bytes(little_endian_view(array))


def array_from_bytes(spec: TensorSpec, data: bytes) -> np.ndarray:
    """A writable native-order array from raw bytes, after checking their length."""
    if len(data) != spec.nbytes:
        raise TensorError(
            f"tensor {spec.name}: received {len(data)} bytes, expected {spec.nbytes} "
            f"(shape {fmt_shape(spec.shape)} of {spec.dtype.upper()})"
        )
    if spec.dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint16)
        return bits.view(ml_dtypes.bfloat16).reshape(spec.shape)
    le = _NUMPY_DTYPES[spec.dtype]
    return np.frombuffer(data, dtype=le).astype(le.newbyteorder("="), copy=True).reshape(spec.shape)


def checked_spec(message: pb.Tensor | pb.TensorSpec | WirePiece) -> TensorSpec:
    """The TensorSpec of a tensor header from the wire, after checking its name (set, not too long),
    dtype (known) and shape (no negative dimension). Raises TensorError naming what is wrong."""
    name = message.name
    if not name:
        raise TensorError("a tensor has no name; every tensor needs one (e.g. fc1.weight)")
    if len(name) > MAX_NAME_LENGTH:
        raise TensorError(f"a tensor name of {len(name)} characters is longer than {MAX_NAME_LENGTH}: {name[:40]!r}...")
    dtype = dtype_from_proto(message.dtype, name)
    if any(d < 0 for d in message.shape):
        raise TensorError(f"tensor {name}: shape {fmt_shape(message.shape)} has a negative dimension")
    return TensorSpec(name, dtype, tuple(int(d) for d in message.shape))


def to_proto(name: str, array: np.ndarray) -> pb.Tensor:
    spec = TensorSpec.of(name, array)
    return pb.Tensor(name=name, dtype=dtype_to_proto(spec.dtype), shape=spec.shape, data=tensor_bytes(array))


def from_proto(message: pb.Tensor) -> np.ndarray:
    return array_from_bytes(checked_spec(message), message.data)


def spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=dtype_to_proto(spec.dtype), shape=spec.shape, buffer=spec.buffer)


def spec_from_proto(message: pb.TensorSpec) -> TensorSpec:
    spec = checked_spec(message)
    return TensorSpec(spec.name, spec.dtype, spec.shape, buffer=message.buffer)


def check_against_manifest(spec: TensorSpec, manifest: Mapping[str, TensorSpec]) -> None:
    """Raise TensorError unless `spec` names a tensor of the manifest with its dtype and shape."""
    expected = manifest.get(spec.name)
    if expected is None:
        raise TensorError(f"unexpected tensor {spec.name}; expected tensors: {', '.join(manifest)}")
    if spec.shape != expected.shape:
        raise TensorError(
            f"tensor {spec.name}: expected shape {fmt_shape(expected.shape)}, got {fmt_shape(spec.shape)}"
        )
    if spec.dtype != expected.dtype:
        raise TensorError(f"tensor {spec.name}: expected dtype {expected.dtype.upper()}, got {spec.dtype.upper()}")


#: Elements checked at a time by check_finite.
_FINITE_BLOCK = 1 << 20


def all_finite(values: np.ndarray) -> bool:
    """Whether a float32 or float64 array holds no NaN or Inf. Read in memory order (a matrix received as a
    transposed view, weightrelay.conversion, is scanned as its contiguous transpose: the same values, not
    copied into C order by reshape), a block at a time into one small mask, because a mask of the whole
    array is fresh memory (slow to touch) and as large as a quarter of it."""
    flat = (values if values.flags.c_contiguous or not values.T.flags.c_contiguous else values.T).reshape(-1)
    mask = np.empty(min(len(flat), _FINITE_BLOCK), dtype=bool)
    blocks = (flat[i : i + _FINITE_BLOCK] for i in range(0, len(flat), _FINITE_BLOCK))
    return all(np.isfinite(block, out=mask[: len(block)]).all() for block in blocks)


def check_finite(name: str, array: np.ndarray) -> None:
    """Raise TensorError, naming the count and the first index, if a float tensor holds NaN or Inf."""
    kind = dtype_name(array.dtype)
    if kind not in _FLOAT_DTYPES:
        return
    values = array if kind in ("float32", "float64") else array.astype(np.float32)
    if all_finite(values):  # the common case
        return
    bad = ~np.isfinite(values)
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        raise TensorError(
            f"tensor {name}: {int(bad.sum())} non-finite value(s) (NaN or Inf), the first at index {first}"
        )
