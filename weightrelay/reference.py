"""A numpy forward pass of a model spec in the canonical layout (inference mode).

The ground truth that every layout conversion and every framework's builder is tested
against: it computes each layer from its definition in float64, N, C, H, W throughout, with
the canonical tensors as they travel on the wire. Each kind's computation is its class's
`reference` (weightrelay.layers), built from the numpy operations here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: the name by which a layer's `inputs` take the model's input
INPUT = "input"

if TYPE_CHECKING:  # the layer kinds import this module for its operations
    from weightrelay.models import ResolvedModel

ACTIVATIONS = {
    "none": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


def _erf(x: np.ndarray) -> np.ndarray:
    """The error function, element by element (numpy has none; math.erf is exact to float64)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x)


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


def avgpool2d_nchw(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    windows = sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
    return windows.mean(axis=(4, 5))


def layernorm(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """Normalise over the last axis with the biased variance, then scale and shift."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def attention(x: np.ndarray, in_proj_weight, in_proj_bias, out_weight, out_bias, heads: int) -> np.ndarray:
    """Self-attention of x [n, tokens, D] from PyTorch's tensors: q, k, v = the three [D]-row blocks of
    in_proj_weight (and of in_proj_bias); head h takes features h*hd .. (h+1)*hd - 1 of each; softmax over
    the keys of q.k / sqrt(hd); the heads' outputs are concatenated back in order and projected by out_weight."""
    n, t, d = x.shape
    hd = d // heads
    q, k, v = (x @ w.T + b for w, b in zip(np.split(in_proj_weight, 3), np.split(in_proj_bias, 3)))
    q, k, v = (a.reshape(n, t, heads, hd).transpose(0, 2, 1, 3) for a in (q, k, v))  # n, heads, t, hd
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = scores / scores.sum(axis=-1, keepdims=True)
    heads_out = (weights @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
    return heads_out @ out_weight.T + out_bias


def batchnorm(x: np.ndarray, weight, bias, running_mean, running_var, eps: float) -> np.ndarray:
    """Normalise over axis 1 (channels or features) with the running statistics."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = weight / np.sqrt(running_var + eps)
    return (x - running_mean.reshape(shape)) * scale.reshape(shape) + bias.reshape(shape)


def forward(model: ResolvedModel, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits float64 [n, classes] for inputs [n, C, H, W] and canonical weights: each layer over the outputs
    of the layers it takes (`ResolvedLayer.sources`), in the spec's order; the last layer's output."""
    outputs = {INPUT: np.asarray(x, dtype=np.float64)}
    w = {name: np.asarray(array, dtype=np.float64) for name, array in weights.items()}
    for r in model.layers:
        inputs = tuple(outputs[source] for source in r.sources)
        outputs[r.name] = ACTIVATIONS[r.layer.activation](r.layer.reference(r, r.tensors(w), inputs))
    return outputs[model.layers[-1].name]
