"""Canonical <-> channels-last layouts, in plain numpy: what Keras and Flax hold.

Canonical (worker.proto): dense weight [out, in], taking a flatten's features in C, H, W order;
conv2d weight [out, in, kh, kw] (OIHW). Channels-last frameworks hold dense kernels [in, out]
whose rows after a flatten of N, H, W, C come in H, W, C order, and convolution kernels
[kh, kw, in, out] (HWIO). Each adapter arranges these arrays in its own containers.
"""

from __future__ import annotations

import numpy as np


def dense_to_in_out(weight: np.ndarray, flattened_from: tuple[int, int, int] | None = None) -> np.ndarray:
    """[out, in] -> [in, out]; after a flatten of (C, H, W), rows reordered C, H, W -> H, W, C."""
    if flattened_from is None:
        return np.ascontiguousarray(weight.T)
    c, h, w = flattened_from
    return np.ascontiguousarray(weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1))


def dense_from_in_out(kernel: np.ndarray, flattened_from: tuple[int, int, int] | None = None) -> np.ndarray:
    """Inverse of dense_to_in_out."""
    if flattened_from is None:
        return np.ascontiguousarray(kernel.T)
    c, h, w = flattened_from
    return np.ascontiguousarray(kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w))


def conv_to_hwio(weight: np.ndarray) -> np.ndarray:
    """[out, in, kh, kw] (OIHW) -> [kh, kw, in, out] (HWIO)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv_from_hwio(kernel: np.ndarray) -> np.ndarray:
    """[kh, kw, in, out] (HWIO) -> [out, in, kh, kw] (OIHW)."""
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """Inputs N, C, H, W -> N, H, W, C (no copy when C is 1)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
