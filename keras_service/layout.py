"""Canonical <-> Keras parameter layout, in plain numpy (no TensorFlow needed to test it).

Keras holds the channels-last arrays of `weightrelay.layouts` (Dense kernel [in, out], rows
after a Flatten in H, W, C order; Conv2D kernel HWIO) as each layer's get_weights() list;
BatchNormalization's list is [gamma, beta, moving_mean, moving_variance], LayerNormalization's
[gamma, beta], MultiHeadAttention's the kernel and bias of its query, key, value and output projections. `LAYOUTS` holds one
`Layout` per kind: the core's channels-last arrays, listed in the order Keras keeps them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from weightrelay.codec import WeightSet
from weightrelay.layouts import CHANNELS_LAST, NO_TENSORS, Layout
from weightrelay.models import ResolvedModel

KerasWeights = Sequence[np.ndarray]  # one layer's get_weights() list


def listed(core: Layout[dict[str, np.ndarray]], order: tuple[str, ...]) -> Layout[KerasWeights]:
    """A core layout whose arrays Keras keeps as a list, in `order` (the core's part names)."""

    def to_keras(tensors, r):
        arrays = core.to_framework(tensors, r)
        return [arrays[part] for part in order]

    def by_part(arrays):
        return dict(zip(order, arrays, strict=True))

    return Layout(to_keras, lambda arrays, r: core.to_canonical(by_part(arrays), r),
                  lambda arrays, r, out: core.read_into(by_part(arrays), r, out),
                  lambda arrays, r: core.canonical_views(by_part(arrays), r))


BATCHNORM_ORDER = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean, moving variance

#: MultiHeadAttention's weights, in the order Keras keeps them (query, key, value, output; kernel, then bias)
ATTENTION_ORDER = ("query_kernel", "query_bias", "key_kernel", "key_bias", "value_kernel", "value_bias", "out_kernel", "out_bias")

#: kind -> its layout in Keras
LAYOUTS: dict[str, Layout[KerasWeights]] = {
    "dense": listed(CHANNELS_LAST["dense"], ("kernel", "bias")),
    "conv2d": listed(CHANNELS_LAST["conv2d"], ("kernel", "bias")),
    "maxpool2d": NO_TENSORS,
    "flatten": NO_TENSORS,
    "batchnorm": listed(CHANNELS_LAST["batchnorm"], BATCHNORM_ORDER),
    "dropout": NO_TENSORS,
    "add": NO_TENSORS,
    "avgpool2d": NO_TENSORS,
    "global_avgpool2d": NO_TENSORS,
    "layernorm": listed(CHANNELS_LAST["layernorm"], ("weight", "bias")),
    "tokens": NO_TENSORS,
    "position_embedding": listed(CHANNELS_LAST["position_embedding"], ("weight",)),
    "multihead_attention": listed(CHANNELS_LAST["multihead_attention"], ATTENTION_ORDER),
    "token_mean": NO_TENSORS,
}


def canonical_to_keras(weights: Mapping[str, np.ndarray], model: ResolvedModel, only: str | None = None) -> dict[str, list[np.ndarray]]:
    """{layer name: the list Keras' layer.set_weights takes} for every layer with tensors (`only`: that layer alone)."""
    return {r.name: LAYOUTS[r.kind].to_framework(r.tensors(weights), r) for r in model.layers if r.params and only in (None, r.name)}


def keras_into_canonical(layer_weights: Mapping[str, KerasWeights], model: ResolvedModel, out: WeightSet) -> None:
    """keras_to_canonical written into `out`'s arrays (the manifest's tensors, by name) instead of fresh ones."""
    for r in model.layers:
        if r.params:
            LAYOUTS[r.kind].read_into(layer_weights[r.name], r, r.tensors(out))


def keras_canonical_views(layer_weights: Mapping[str, KerasWeights], model: ResolvedModel) -> WeightSet:
    """keras_to_canonical as views of the arrays given where a kind's conversion is a plain transpose
    (Layout.canonical_views), fresh arrays elsewhere."""
    weights: WeightSet = {}
    for r in model.layers:
        if r.params:
            weights.update(r.named(LAYOUTS[r.kind].canonical_views(layer_weights[r.name], r)))
    return weights


def keras_to_canonical(layer_weights: Mapping[str, KerasWeights], model: ResolvedModel) -> WeightSet:
    """Canonical tensors, in the manifest's order, from {layer name: layer.get_weights()}."""
    weights: WeightSet = {}
    for r in model.layers:
        if r.params:
            weights.update(r.named(LAYOUTS[r.kind].to_canonical(layer_weights[r.name], r)))
    return weights
