"""Canonical <-> Flax parameter layout, in plain numpy (no JAX needed to test it).

Flax holds the channels-last arrays of `weightrelay.layouts` (Dense kernel [in, out], rows after a
flatten of N, H, W, C in H, W, C order; Conv kernel HWIO) under `params[layer]["kernel"]`; a
BatchNorm keeps `params[layer]["scale"]`, `["bias"]` and `batch_stats[layer]["mean"]`, `["var"]`; a
LayerNorm `["scale"]`, `["bias"]`; a MultiHeadDotProductAttention one {"kernel", "bias"} per projection
under `["query"]`, `["key"]`, `["value"]`, `["out"]`.
`LAYOUTS` holds one `Layout` per kind: the core's channels-last arrays, placed in those two trees.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from weightrelay.codec import WeightSet
from weightrelay.layouts import CHANNELS_LAST, NO_TENSORS, Layout, fresh_copy, reordered_rows
from weightrelay.models import ResolvedModel

Tree = dict[str, dict[str, Any]]
Leaves = dict[str, np.ndarray]  # one layer's entries in a tree


def in_trees(core: Layout[dict[str, np.ndarray]], params: dict[str, str], stats: dict[str, str] | None = None) -> Layout[tuple[Leaves, Leaves]]:
    """A core layout whose arrays Flax keeps in (params, batch_stats): each maps Flax's name -> the core's part; a
    name "a/b" is entry b of the layer's submodule a (e.g. "query/kernel")."""
    stats = stats or {}

    def place(arrays, names):
        leaves: Leaves = {}
        for key, part in names.items():
            *inner, leaf = key.split("/")
            node = leaves
            for step in inner:
                node = node.setdefault(step, {})
            node[leaf] = arrays[part]
        return leaves

    def pick(leaves, key):
        for step in key.split("/"):
            leaves = leaves[step]
        return leaves

    def to_flax(tensors, r):
        arrays = core.to_framework(tensors, r)
        return place(arrays, params), place(arrays, stats)

    def by_part(trees):
        in_params, in_stats = trees
        return {part: pick(in_params, key) for key, part in params.items()} | {part: pick(in_stats, key) for key, part in stats.items()}

    return Layout(to_flax, lambda trees, r: core.to_canonical(by_part(trees), r),
                  lambda trees, r, out: core.read_into(by_part(trees), r, out),
                  lambda trees, r: core.canonical_views(by_part(trees), r))


#: kind -> its layout in Flax: (its params entries, its batch_stats entries)
LAYOUTS: dict[str, Layout[tuple[Leaves, Leaves]]] = {
    "dense": in_trees(CHANNELS_LAST["dense"], {"kernel": "kernel", "bias": "bias"}),
    "conv2d": in_trees(CHANNELS_LAST["conv2d"], {"kernel": "kernel", "bias": "bias"}),
    "maxpool2d": NO_TENSORS,
    "flatten": NO_TENSORS,
    "batchnorm": in_trees(CHANNELS_LAST["batchnorm"], {"scale": "weight", "bias": "bias"}, {"mean": "running_mean", "var": "running_var"}),
    "dropout": NO_TENSORS,
    "add": NO_TENSORS,
    "avgpool2d": NO_TENSORS,
    "global_avgpool2d": NO_TENSORS,
    "layernorm": in_trees(CHANNELS_LAST["layernorm"], {"scale": "weight", "bias": "bias"}),
    "tokens": NO_TENSORS,
    "position_embedding": in_trees(CHANNELS_LAST["position_embedding"], {"embedding": "weight"}),
    "multihead_attention": in_trees(CHANNELS_LAST["multihead_attention"], {
        f"{flax}/{leaf}": f"{core}_{leaf}" for flax, core in (("query", "query"), ("key", "key"), ("value", "value"), ("out", "out"))
        for leaf in ("kernel", "bias")}),
    "token_mean": NO_TENSORS,
}


def canonical_to_flax(weights: Mapping[str, np.ndarray], model: ResolvedModel,
                      converted: Mapping[str, np.ndarray] | None = None) -> tuple[Tree, Tree]:
    """(params, batch_stats) for Flax from canonical tensors. `converted`: dense weights already transposed
    into kernels (fresh memory, from layouts.transposed_kernels' names), taken as they are."""
    params: Tree = {}
    stats: Tree = {}
    converted = converted or {}
    for r in model.layers:
        if r.params:
            kernel = converted.get(f"{r.name}.weight") if r.kind == "dense" and reordered_rows(r) is None else None
            if kernel is not None and kernel.shape == weights[f"{r.name}.weight"].shape[::-1]:
                params[r.name] = {"kernel": kernel, "bias": fresh_copy(weights[f"{r.name}.bias"])}
                continue
            layer_params, layer_stats = LAYOUTS[r.kind].to_framework(r.tensors(weights), r)
            for tree, leaves in ((params, layer_params), (stats, layer_stats)):
                if leaves:
                    tree[r.name] = leaves
    return params, stats


def flax_into_canonical(params: Mapping[str, Mapping[str, Any]], stats: Mapping[str, Mapping[str, Any]], model: ResolvedModel,
                        out: WeightSet) -> None:
    """flax_to_canonical written into `out`'s arrays (the manifest's tensors, by name) instead of fresh ones."""
    for r in model.layers:
        if r.params:
            LAYOUTS[r.kind].read_into((params.get(r.name, {}), stats.get(r.name, {})), r, r.tensors(out))


def flax_canonical_views(params: Mapping[str, Mapping[str, Any]], stats: Mapping[str, Mapping[str, Any]], model: ResolvedModel) -> WeightSet:
    """flax_to_canonical as views of the arrays given where a kind's conversion is a plain transpose
    (Layout.canonical_views), fresh arrays elsewhere."""
    weights: WeightSet = {}
    for r in model.layers:
        if r.params:
            weights.update(r.named(LAYOUTS[r.kind].canonical_views((params.get(r.name, {}), stats.get(r.name, {})), r)))
    return weights


def flax_to_canonical(params: Mapping[str, Mapping[str, Any]], stats: Mapping[str, Mapping[str, Any]], model: ResolvedModel) -> WeightSet:
    """Canonical tensors, in the manifest's order, from Flax's (params, batch_stats), as numpy arrays."""
    weights: WeightSet = {}
    for r in model.layers:
        if r.params:
            weights.update(r.named(LAYOUTS[r.kind].to_canonical((params.get(r.name, {}), stats.get(r.name, {})), r)))
    return weights
