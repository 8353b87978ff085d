"""A numpy forward pass of a model spec in the canonical layout (inference mode).

The ground truth that every layout conversion and every framework's builder is tested
against: it computes each layer from its definition in float64, N, C, H, W throughout, with
the canonical tensors as they travel on the wire. Each kind's computation is its class's
`reference` (weightrelay.layers), built from the numpy operations here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:  # the layer kinds import this module for its operations
    from weightrelay.models import ResolvedModel

ACTIVATIONS = {
    "none": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}


def conv2d_nchw(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int, padding: tuple[int, int, int, int]) -> np.ndarray:
    """x [n, c, h, w], weight [out, c, kh, kw] (OIHW), zero padding (top, bottom, left, right)."""
    top, bottom, left, right = padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = weight.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # n, c, oh, ow, kh, kw
    return np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True) + bias[None, :, None, None]


def maxpool2d_nchw(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    windows = sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
    return windows.max(axis=(4, 5))


def batchnorm(x: np.ndarray, weight, bias, running_mean, running_var, eps: float) -> np.ndarray:
    """Normalise over axis 1 (channels or features) with the running statistics."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = weight / np.sqrt(running_var + eps)
    return (x - running_mean.reshape(shape)) * scale.reshape(shape) + bias.reshape(shape)


def forward(model: ResolvedModel, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits float64 [n, classes] for inputs [n, C, H, W] and canonical weights."""
    h = np.asarray(x, dtype=np.float64)
    w = {name: np.asarray(array, dtype=np.float64) for name, array in weights.items()}
    for r in model.layers:
        h = ACTIVATIONS[r.layer.activation](r.layer.reference(r, r.tensors(w), (h,)))
    return h
