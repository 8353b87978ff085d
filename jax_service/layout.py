"""Canonical <-> Flax parameter layout, in plain numpy (no JAX needed to test it).

Flax holds the channels-last arrays of `weightrelay.layouts` (Dense kernel [in, out], rows after a
flatten of N, H, W, C in H, W, C order; Conv kernel HWIO) under `params[layer]["kernel"]`; a
BatchNorm keeps `params[layer]["scale"]`, `["bias"]` and `batch_stats[layer]["mean"]`, `["var"]`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from weightrelay.codec import WeightSet
from weightrelay.layouts import conv_from_hwio, conv_to_hwio, dense_from_in_out, dense_to_in_out
from weightrelay.models import BatchNorm, Conv2D, Dense, ResolvedModel

Tree = dict[str, dict[str, Any]]


def canonical_to_flax(weights: Mapping[str, np.ndarray], model: ResolvedModel) -> tuple[Tree, Tree]:
    """(params, batch_stats) for Flax from canonical tensors."""
    params: Tree = {}
    stats: Tree = {}
    for r in model.layers:
        name = r.name
        if isinstance(r.layer, Dense):
            params[name] = {"kernel": dense_to_in_out(weights[f"{name}.weight"], r.flattened_from), "bias": np.array(weights[f"{name}.bias"])}
        elif isinstance(r.layer, Conv2D):
            params[name] = {"kernel": conv_to_hwio(weights[f"{name}.weight"]), "bias": np.array(weights[f"{name}.bias"])}
        elif isinstance(r.layer, BatchNorm):
            params[name] = {"scale": np.array(weights[f"{name}.weight"]), "bias": np.array(weights[f"{name}.bias"])}
            stats[name] = {"mean": np.array(weights[f"{name}.running_mean"]), "var": np.array(weights[f"{name}.running_var"])}
    return params, stats


def flax_to_canonical(params: Mapping[str, Mapping[str, Any]], stats: Mapping[str, Mapping[str, Any]], model: ResolvedModel) -> WeightSet:
    """Canonical tensors from Flax's (params, batch_stats), as numpy arrays."""
    weights: WeightSet = {}
    for r in model.layers:
        name = r.name
        if isinstance(r.layer, Dense):
            weights[f"{name}.weight"] = dense_from_in_out(np.asarray(params[name]["kernel"]), r.flattened_from)
            weights[f"{name}.bias"] = np.array(params[name]["bias"])
        elif isinstance(r.layer, Conv2D):
            weights[f"{name}.weight"] = conv_from_hwio(np.asarray(params[name]["kernel"]))
            weights[f"{name}.bias"] = np.array(params[name]["bias"])
        elif isinstance(r.layer, BatchNorm):
            weights[f"{name}.weight"] = np.array(params[name]["scale"])
            weights[f"{name}.bias"] = np.array(params[name]["bias"])
            weights[f"{name}.running_mean"] = np.array(stats[name]["mean"])
            weights[f"{name}.running_var"] = np.array(stats[name]["var"])
    return weights
