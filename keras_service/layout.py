"""Canonical <-> Keras parameter layout, in plain numpy (no TensorFlow needed to test it).

Keras holds the channels-last arrays of `weightrelay.layouts` (Dense kernel [in, out], rows
after a Flatten in H, W, C order; Conv2D kernel HWIO) as each layer's get_weights() list;
BatchNormalization's list is [gamma, beta, moving_mean, moving_variance].
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from weightrelay.codec import WeightSet
from weightrelay.layouts import conv_from_hwio, conv_to_hwio, dense_from_in_out, dense_to_in_out
from weightrelay.models import BatchNorm, Conv2D, Dense, ResolvedModel


BATCHNORM_ORDER = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean, moving variance


def canonical_to_keras(weights: Mapping[str, np.ndarray], model: ResolvedModel) -> dict[str, list[np.ndarray]]:
    """{layer name: the list Keras' layer.set_weights takes} for every layer with tensors."""
    out: dict[str, list[np.ndarray]] = {}
    for r in model.layers:
        name = r.name
        if isinstance(r.layer, Dense):
            out[name] = [dense_to_in_out(weights[f"{name}.weight"], r.flattened_from), np.array(weights[f"{name}.bias"])]
        elif isinstance(r.layer, Conv2D):
            out[name] = [conv_to_hwio(weights[f"{name}.weight"]), np.array(weights[f"{name}.bias"])]
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
            weights[f"{name}.weight"] = dense_from_in_out(np.asarray(kernel), r.flattened_from)
            weights[f"{name}.bias"] = np.array(bias)
        elif isinstance(r.layer, Conv2D):
            kernel, bias = layer_weights[name]
            weights[f"{name}.weight"] = conv_from_hwio(np.asarray(kernel))
            weights[f"{name}.bias"] = np.array(bias)
        elif isinstance(r.layer, BatchNorm):
            for part, array in zip(BATCHNORM_ORDER, layer_weights[name], strict=True):
                weights[f"{name}.{part}"] = np.array(array)
    return weights
