"""Canonical <-> Keras parameter layout, in plain numpy (no TensorFlow needed to test it).

Canonical: `<layer>.weight` [out, in], `<layer>.bias` [out]. Keras Dense: kernel [in, out], bias [out].
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from weightrelay.codec import WeightSet


def canonical_to_keras(weights: Mapping[str, np.ndarray], layers: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """{layer: [kernel [in, out], bias]} from canonical tensors."""
    return {
        layer: [np.ascontiguousarray(weights[f"{layer}.weight"].T), np.array(weights[f"{layer}.bias"])]
        for layer in layers
    }


def keras_to_canonical(layer_weights: Mapping[str, Sequence[np.ndarray]]) -> WeightSet:
    """Canonical tensors from {layer: [kernel [in, out], bias]}."""
    weights: WeightSet = {}
    for layer, (kernel, bias) in layer_weights.items():
        weights[f"{layer}.weight"] = np.ascontiguousarray(np.asarray(kernel).T)
        weights[f"{layer}.bias"] = np.array(bias)
    return weights
