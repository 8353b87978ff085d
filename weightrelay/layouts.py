"""Canonical <-> each framework's own layout, per layer kind: the numpy core.

One numpy core (this module: the array arithmetic, and each kind's channels-last layout in
`CHANNELS_LAST`) and thin per-framework shims (`keras_service.layout`, `jax_service.layout`) that
place these arrays in the framework's own containers, one `Layout` per kind in a table keyed by
kind. PyTorch holds the canonical layout itself (its state_dict names and shapes are the wire's),
so it needs none; on the CPU it keeps a large dense weight (transposed_kernels) in [in, out] memory, seen
as [out, in], to move it as Keras and JAX hold theirs.

Canonical (worker.proto): dense weight [out, in], taking a flatten's features in C, H, W order;
conv2d weight [out, in, kh, kw] (OIHW). Channels-last frameworks hold dense kernels [in, out]
whose rows after a flatten of N, H, W, C come in H, W, C order, and convolution kernels
[kh, kw, in, out] (HWIO); per-channel vectors (biases, batchnorm's and layernorm's tensors) and the
position embedding's [tokens, features] table (tokens are row-major over H, W everywhere) are the
same in every layout. Attention is canonical in PyTorch's packing (`in_proj_weight` [3D, D]: q, k, v
stacked; `out_proj.weight` [D, D]); Keras and Flax hold one kernel [D, heads, head_dim] and bias
[heads, head_dim] per projection and an output kernel [heads, head_dim, D]. Every conversion copies
into fresh C-contiguous arrays, aligned (buffers.aligned_empty: so that a framework can take them as its
own memory without another copy), never handing back its input (the worker reuses a received set's
memory and a framework may keep the very array it is assigned). A round trip is bit-exact.
`Layout.read_into` writes a kind's canonical tensors straight into arrays the caller gives (a worker's
reused send buffer) instead of fresh ones.

Large dense kernels are transposed tile by tile (`weightrelay.transpose`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

import numpy as np

from weightrelay.buffers import aligned_empty
from weightrelay.layers import ResolvedLayer
from weightrelay.models import ResolvedModel
from weightrelay.transpose import transpose_into

F = TypeVar("F")
#: one layer's canonical tensors by part: {"weight": ..., "bias": ...}
Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Layout(Generic[F]):
    """How one kind's tensors sit in one framework: `to_framework(tensors, r)` takes the layer's canonical
    tensors by part and gives the framework's own form of them (F: a list, a tree, ...); `to_canonical(form, r)`
    gives back every part, bit for bit. Both are pure: numpy arrays in, new numpy arrays out."""

    to_framework: Callable[[Tensors, ResolvedLayer], F]
    to_canonical: Callable[[F, ResolvedLayer], dict[str, np.ndarray]]
    #: `into(form, r, out)`: what to_canonical gives, written into `out`'s arrays (by part) instead of fresh
    #: ones; None: to_canonical's arrays are copied there (for kinds whose tensors are small)
    into: Callable[[F, ResolvedLayer, Tensors], None] | None = None
    #: `view(form, r)`: the canonical tensors by part as views of the framework's memory where the conversion
    #: is a plain transpose (numpy views, strided: read them before the framework changes its arrays); None:
    #: to_canonical's fresh arrays
    view: Callable[[F, ResolvedLayer], dict[str, np.ndarray]] | None = None

    def read_into(self, form: F, r: ResolvedLayer, out: Tensors) -> None:
        """The layer's canonical tensors, from the framework's `form`, written into `out` (by part, each of
        its tensor's shape and dtype): without a full-size array between them where the kind has `into`."""
        if self.into is not None:
            self.into(form, r, out)
            return
        for part, array in self.to_canonical(form, r).items():
            np.copyto(out[part], array)

    def canonical_views(self, form: F, r: ResolvedLayer) -> dict[str, np.ndarray]:
        """The layer's canonical tensors by part, as views of `form`'s memory where the kind has `view` (a
        sender streams them band by band, codec.wire), else fresh arrays."""
        return (self.view or self.to_canonical)(form, r)


def _holds_none(form: Any, r: ResolvedLayer) -> Any:
    raise ValueError(f"layer {r.name}: a {r.kind} layer holds no tensors, so it has no layout")


#: The layout of kinds that hold no tensors (pooling, flatten, dropout): the conversions skip their layers.
NO_TENSORS: Layout[Any] = Layout(_holds_none, _holds_none)


# -- fresh arrays ----------------------------------------------------------------------------
def fresh_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, aligned copy of `array`."""
    out = aligned_empty(array.shape, array.dtype)
    np.copyto(out, array)
    return out


def transposed(src: np.ndarray) -> np.ndarray:
    """src.T of a 2-D array as a fresh aligned C-contiguous array (transpose_into)."""
    out = aligned_empty(src.shape[::-1], src.dtype)
    transpose_into(src, out)
    return out


# -- the arithmetic ---------------------------------------------------------------------------
def _rows_hwc_from_chw(rows: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """[c*h*w, n] rows in C, H, W order -> a fresh array of them in H, W, C order (whole rows move)."""
    return fresh_copy(rows.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1))


def _rows_chw_from_hwc(rows: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """Inverse of _rows_hwc_from_chw."""
    return fresh_copy(rows.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1))


def dense_to_in_out(weight: np.ndarray, flattened_from: tuple[int, int, int] | None = None) -> np.ndarray:
    """[out, in] -> [in, out]; after a flatten of (C, H, W), rows reordered C, H, W -> H, W, C."""
    if flattened_from is None:
        return transposed(weight)
    return _rows_hwc_from_chw(transposed(weight), *flattened_from)


def dense_from_in_out(kernel: np.ndarray, flattened_from: tuple[int, int, int] | None = None,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of dense_to_in_out; written into `out` (the canonical shape) where given, which is returned."""
    if out is None:
        out = aligned_empty(kernel.shape[::-1], kernel.dtype)
    transpose_into(kernel if flattened_from is None else _rows_chw_from_hwc(kernel, *flattened_from), out)
    return out


def conv_to_hwio(weight: np.ndarray) -> np.ndarray:
    """[out, in, kh, kw] (OIHW) -> [kh, kw, in, out] (HWIO)."""
    return fresh_copy(weight.transpose(2, 3, 1, 0))


def conv_from_hwio(kernel: np.ndarray) -> np.ndarray:
    """[kh, kw, in, out] (HWIO) -> [out, in, kh, kw] (OIHW)."""
    return fresh_copy(kernel.transpose(3, 2, 0, 1))


def qkv_to_heads(in_proj_weight: np.ndarray, in_proj_bias: np.ndarray, heads: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """PyTorch's packed [3D, D] (rows: q, then k, then v; y = x @ W^T) and [3D] -> per projection q, k, v a
    kernel [D, heads, head_dim] (y[..., h, j] = x @ kernel[:, h, j]) and a bias [heads, head_dim]."""
    d = in_proj_weight.shape[1]
    # np.array copies: a reshaped slice of the bias would still be the caller's memory, which the worker
    # reuses for the next weight set (a framework may keep the very array it is given)
    return [(np.array(w.T.reshape(d, heads, d // heads), order="C"), np.array(b.reshape(heads, d // heads), order="C"))
            for w, b in zip(np.split(in_proj_weight, 3), np.split(in_proj_bias, 3))]


def qkv_from_heads(projections: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of qkv_to_heads: (in_proj_weight [3D, D], in_proj_bias [3D]) from q, k, v's (kernel, bias)."""
    d = projections[0][0].shape[0]
    weight = np.concatenate([np.asarray(kernel).reshape(d, d).T for kernel, _ in projections])
    bias = np.concatenate([np.asarray(bias).reshape(d) for _, bias in projections])
    return np.array(weight, order="C"), np.array(bias, order="C")


def out_to_heads(out_weight: np.ndarray, heads: int) -> np.ndarray:
    """PyTorch's output projection [D, D] (y = concat(heads) @ W^T) -> [heads, head_dim, D]."""
    d = out_weight.shape[0]
    return np.array(out_weight.T.reshape(heads, d // heads, d), order="C")


def out_from_heads(kernel: np.ndarray) -> np.ndarray:
    """Inverse of out_to_heads."""
    d = kernel.shape[2]
    return np.array(np.asarray(kernel).reshape(-1, d).T, order="C")


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """Inputs N, C, H, W -> N, H, W, C (no copy when C is 1)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# -- each kind's channels-last layout, by part ------------------------------------------------
def reordered_rows(r: ResolvedLayer) -> tuple[int, int, int] | None:
    """The (C, H, W) whose order a dense layer's kernel rows change (C, H, W -> H, W, C), or None where its
    kernel is its weight's plain transpose: no flatten before it, or a flatten of one channel or of one
    position, whose C, H, W order already is the H, W, C order (the seed's MLP on MNIST)."""
    shape = r.flattened_from
    return shape if shape is not None and shape[0] > 1 and shape[1] * shape[2] > 1 else None


def transposed_kernels(model: ResolvedModel, min_bytes: int) -> set[str]:
    """The canonical names of the dense weights whose channels-last kernel is their plain transpose
    (reordered_rows), of at least `min_bytes` and over one row and one column: what a receive converts
    straight into a framework's layout (weightrelay.conversion)."""
    return {spec.name for r in model.layers if r.kind == "dense" and reordered_rows(r) is None
            for spec in r.params if spec.name == f"{r.name}.weight" and spec.nbytes >= min_bytes and min(spec.shape) > 1}


def _dense_to_channels_last(tensors: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    return {"kernel": dense_to_in_out(tensors["weight"], reordered_rows(r)), "bias": fresh_copy(tensors["bias"])}


def _dense_from_channels_last(arrays: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    return {"weight": dense_from_in_out(np.asarray(arrays["kernel"]), reordered_rows(r)), "bias": fresh_copy(np.asarray(arrays["bias"]))}


def _dense_views(arrays: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    if reordered_rows(r) is not None:  # rows reordered too: no view
        return _dense_from_channels_last(arrays, r)
    return {"weight": np.asarray(arrays["kernel"]).T, "bias": np.asarray(arrays["bias"])}


def _dense_into_canonical(arrays: Tensors, r: ResolvedLayer, out: Tensors) -> None:
    dense_from_in_out(np.asarray(arrays["kernel"]), reordered_rows(r), out=out["weight"])
    np.copyto(out["bias"], arrays["bias"])


def _conv2d_to_channels_last(tensors: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    return {"kernel": conv_to_hwio(tensors["weight"]), "bias": fresh_copy(tensors["bias"])}


def _conv2d_from_channels_last(arrays: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    return {"weight": conv_from_hwio(np.asarray(arrays["kernel"])), "bias": fresh_copy(np.asarray(arrays["bias"]))}


def _copies(arrays: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    return {part: fresh_copy(np.asarray(array)) for part, array in arrays.items()}


PROJECTIONS = ("query", "key", "value")


def _attention_to_channels_last(tensors: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    arrays = {}
    for projection, (kernel, bias) in zip(PROJECTIONS, qkv_to_heads(tensors["in_proj_weight"], tensors["in_proj_bias"], r.layer.heads)):
        arrays[f"{projection}_kernel"], arrays[f"{projection}_bias"] = kernel, bias
    return {**arrays, "out_kernel": out_to_heads(tensors["out_proj.weight"], r.layer.heads), "out_bias": np.array(tensors["out_proj.bias"])}


def _attention_from_channels_last(arrays: Tensors, r: ResolvedLayer) -> dict[str, np.ndarray]:
    weight, bias = qkv_from_heads([(arrays[f"{p}_kernel"], arrays[f"{p}_bias"]) for p in PROJECTIONS])
    return {"in_proj_weight": weight, "in_proj_bias": bias, "out_proj.weight": out_from_heads(arrays["out_kernel"]),
            "out_proj.bias": np.array(arrays["out_bias"])}


#: kind -> canonical tensors <-> the channels-last arrays Keras and Flax hold, by part: dense and conv2d
#: {"kernel", "bias"}; batchnorm, layernorm and position_embedding their canonical parts (they need no
#: conversion); multihead_attention {"query_kernel", "query_bias", "key_...", "value_...", "out_kernel", "out_bias"}.
CHANNELS_LAST: dict[str, Layout[dict[str, np.ndarray]]] = {
    "dense": Layout(_dense_to_channels_last, _dense_from_channels_last, _dense_into_canonical, _dense_views),
    "conv2d": Layout(_conv2d_to_channels_last, _conv2d_from_channels_last),
    "maxpool2d": NO_TENSORS,
    "flatten": NO_TENSORS,
    "batchnorm": Layout(_copies, _copies),
    "dropout": NO_TENSORS,
    "add": NO_TENSORS,
    "avgpool2d": NO_TENSORS,
    "global_avgpool2d": NO_TENSORS,
    "layernorm": Layout(_copies, _copies),
    "tokens": NO_TENSORS,
    "position_embedding": Layout(_copies, _copies),
    "multihead_attention": Layout(_attention_to_channels_last, _attention_from_channels_last),
    "token_mean": NO_TENSORS,
}
