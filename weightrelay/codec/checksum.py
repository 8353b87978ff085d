"""The weight-set checksum (worker.proto, top): SHA-256 over the tensors in name order, each as
its header (`tensor_header`) then its little-endian bytes. A sender hashes a whole set with
`weights_sha256`; a receiver hashes a stream as it arrives (codec.stream) with the same header,
so both give the same checksum byte for byte.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

from weightrelay.codec.tensors import TensorSpec, little_endian_view


def tensor_header(spec: TensorSpec) -> bytes:
    """What the set checksum hashes before a tensor's bytes: the UTF-8 name, NUL, the dtype's enum
    name (e.g. "FLOAT32"), NUL, the shape as decimals joined by ",", NUL (see worker.proto).
    The only place this header is built: whole-set and streaming hashes agree because both use it."""
    return spec.name.encode() + b"\0" + spec.dtype.upper().encode() + b"\0" + ",".join(str(d) for d in spec.shape).encode() + b"\0"


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """Checksum of a weight set, independent of tensor order (see worker.proto)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = weights[name]
        digest.update(tensor_header(TensorSpec.of(name, array)))
        digest.update(little_endian_view(array))  # no copy for little-endian, C-order arrays
    return digest.hexdigest()


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same values bit for bit (-0.0 is not 0.0), compared directly rather than by hashing."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8)))
