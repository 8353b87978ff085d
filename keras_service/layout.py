"""Canonical <-> Keras parameter layout, in plain numpy (no TensorFlow needed to test it).

Canonical (worker.proto): dense weight [out, in] taking a flatten's features in C, H, W order;
conv2d weight [out, in, kh, kw]; batchnorm weight, bias, running_mean, running_var.
Keras: Dense kernel [in, out] whose rows after a Flatten of N, H, W, C come in H, W, C order;
Conv2D kernel [kh, kw, in, out]; BatchNormalization [gamma, beta, moving_mean, moving_variance].
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from weightrelay.codec import WeightSet
from weightrelay.models import BatchNorm, Conv2D, Dense, ResolvedModel


def dense_kernel_to_keras(weight: np.ndarray, flattened_from: tuple[int, int, int] | None = None) -> np.ndarray:
    """[out, in] -> [in, out]; after a flatten of (C, H, W), rows reordered C, H, W -> H, W, C."""
    if flattened_from is None:
        return np.ascontiguousarray(weight.T)
    c, h, w = flattened_from
    return np.ascontiguousarray(weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1))


def dense_kernel_from_keras(kernel: np.ndarray, flattened_from: tuple[int, int, int] | None = None) -> np.ndarray:
    """Inverse of dense_kernel_to_keras."""
    if flattened_from is None:
        return np.ascontiguousarray(kernel.T)
    c, h, w = flattened_from
    return np.ascontiguousarray(kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w))


def conv_kernel_to_keras(weight: np.ndarray) -> np.ndarray:
    """[out, in, kh, kw] (OIHW) -> [kh, kw, in, out] (HWIO)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv_kernel_from_keras(kernel: np.ndarray) -> np.ndarray:
    """[kh, kw, in, out] (HWIO) -> [out, in, kh, kw] (OIHW)."""
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


BATCHNORM_ORDER = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean, moving variance


def canonical_to_keras(weights: Mapping[str, np.ndarray], model: ResolvedModel) -> dict[str, list[np.ndarray]]:
    """{layer name: the list Keras' layer.set_weights takes} for every layer with tensors."""
    out: dict[str, list[np.ndarray]] = {}
    for r in model.layers:
        name = r.name
        if isinstance(r.layer, Dense):
            out[name] = [dense_kernel_to_keras(weights[f"{name}.weight"], r.flattened_from), np.array(weights[f"{name}.bias"])]
        elif isinstance(r.layer, Conv2D):
            out[name] = [conv_kernel_to_keras(weights[f"{name}.weight"]), np.array(weights[f"{name}.bias"])]
        elif isinstance(r.layer, BatchNorm):
            out[name] = [np.array(weights[f"{name}.{part}"]) for part in BATCHNORM_ORDER]
    return out


def keras_to_canonical(layer_weights: Mapping[str, Sequence[np.ndarray]], model: ResolvedModel) -> WeightSet:
    """Canonical tensors from {layer name: layer.get_weights()}."""
    weights: WeightSet = {}
    for r in model.layers:
        name = r.name
        if isinstance(r.layer, Dense):
            kernel, bias = layer_weights[name]
            weights[f"{name}.weight"] = dense_kernel_from_keras(np.asarray(kernel), r.flattened_from)
            weights[f"{name}.bias"] = np.array(bias)
        elif isinstance(r.layer, Conv2D):
            kernel, bias = layer_weights[name]
            weights[f"{name}.weight"] = conv_kernel_from_keras(np.asarray(kernel))
            weights[f"{name}.bias"] = np.array(bias)
        elif isinstance(r.layer, BatchNorm):
            for part, array in zip(BATCHNORM_ORDER, layer_weights[name], strict=True):
                weights[f"{name}.{part}"] = np.array(array)
    return weights
