"""A resolved model spec and its canonical weights as an ONNX model: a pure function, no framework.

The canonical layout is ONNX's own (activations N, C, H, W; a flatten orders features C, H, W; tokens
N, tokens, features; dense weights [out, in]; convolution weights OIHW; attention PyTorch's packing),
so every tensor goes in as it is, named as on the wire, and every kind of `weightrelay.layers`
exports, each computed as its numpy reference (`weightrelay.reference`) computes it:

- dense: Gemm with transB=1 on flat features; on tokens [batch, tokens, features] MatMul with the
  transposed weight, then Add of the bias;
- conv2d: Conv with the resolved padding (TensorFlow's SAME spelled out as begin/end pads);
- maxpool2d, avgpool2d: MaxPool, AveragePool (no padding: every window is whole);
- flatten: Flatten; global_avgpool2d: ReduceMean over H, W; token_mean: ReduceMean over the tokens;
- batchnorm: BatchNormalization in inference mode (the running statistics); dropout: Identity;
- add: Add of its inputs in their order; position_embedding: Add of the table [tokens, features];
- layernorm: LayerNormalization over the last axis with the spec's eps;
- tokens: Reshape to [batch, C, H*W] and Transpose to [batch, H*W, C] (row-major over H, W);
- multihead_attention: the packed q, k, v projection (MatMul + Add), Reshape to [batch, tokens, 3,
  heads, head_dim] and Transpose, Gather of q, k and v, softmax of q.k^T / sqrt(head_dim) over the
  keys, its MatMul with v, the heads merged back in order (Transpose, Reshape) and the output
  projection (MatMul + Add);
- activations relu, tanh, sigmoid: Relu, Tanh, Sigmoid; gelu (exact): 0.5 x (1 + Erf(x / sqrt 2));
  gelu_tanh: 0.5 x (1 + Tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (opset 17 has no Gelu).

A layer takes the outputs of the layers it names (`ResolvedLayer.sources`, as `models.resolve` records
them), so graphs (residual networks, transformers) export as they are. The graph takes `input` float32
[batch, C, H, W] and gives `logits` [batch, classes] and `probabilities` (their softmax), as a worker
computes them. A layer's output is named as the layer; the tensors inside a layer are `<layer>/<what>`.

`ONNX_BUILDERS` holds one function per kind. A kind without one (one added to `weightrelay.layers`
later) is refused, naming the kind, until its function is added here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from weightrelay.models import INPUT, ResolvedLayer, ResolvedModel

#: The opset the graph is written for: every operator used here has had its current form since before it,
#: and every onnxruntime of the last years runs it.
OPSET = 17
LOGITS, PROBABILITIES = "logits", "probabilities"


class UnsupportedKind(ValueError):
    """A layer kind the ONNX export has no function for; the message names the layer, its kind and the ways out."""


@dataclass
class Graph:
    """The nodes and initializers (weights) of the graph being built, in order."""

    weights: Mapping[str, np.ndarray]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        """Add one node named and output as `output`; return the output's name."""
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def tensor(self, r: ResolvedLayer, part: str) -> str:
        """Layer `r`'s canonical tensor `part` as an initializer named as on the wire (fc1.weight)."""
        name = f"{r.name}.{part}"
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(self.weights[name], dtype=np.float32), name))
        return name

    def constant(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        """A Constant node (a shape, an index, a scalar): the initializers stay the weights alone."""
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return self.node("Constant", [], name, value=tensor)

    def linear(self, r: ResolvedLayer, x: str, weight: str, bias: str, output: str, tokens: bool) -> str:
        """x @ weight.T + bias for canonical [out, in] weights: Gemm on flat features [batch, in]; on tokens
        [batch, tokens, in] (Gemm takes only 2-D) MatMul with the transposed weight, then Add of the bias."""
        if not tokens:
            return self.node("Gemm", [x, self.tensor(r, weight), self.tensor(r, bias)], output, transB=1)
        transposed = self.node("Transpose", [self.tensor(r, weight)], f"{r.name}/{weight}_t", perm=[1, 0])
        product = self.node("MatMul", [x, transposed], f"{output}/matmul")
        return self.node("Add", [product, self.tensor(r, bias)], output)


def output_name(r: ResolvedLayer) -> str:
    """The name of a layer's output (before its activation): the layer's, unless it is one of the graph's outputs."""
    return r.name if r.name not in (LOGITS, PROBABILITIES) else f"{r.name}/output"


# -- one function per kind: its nodes over its input(s), returning the name of its output (before the activation)
def onnx_dense(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.linear(r, inputs[0], "weight", "bias", output_name(r), tokens=len(r.input_shape) == 2)


def onnx_conv2d(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    top, bottom, left, right = r.padding
    k, s = r.layer.kernel, r.layer.stride
    return g.node("Conv", [inputs[0], g.tensor(r, "weight"), g.tensor(r, "bias")], output_name(r),
                  kernel_shape=[k, k], strides=[s, s], pads=[top, left, bottom, right])


def onnx_maxpool2d(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    size, step = r.layer.size, r.layer.step
    return g.node("MaxPool", [inputs[0]], output_name(r), kernel_shape=[size, size], strides=[step, step])


def onnx_avgpool2d(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    size, step = r.layer.size, r.layer.step  # no padding: count_include_pad never enters
    return g.node("AveragePool", [inputs[0]], output_name(r), kernel_shape=[size, size], strides=[step, step])


def onnx_global_avgpool2d(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("ReduceMean", [inputs[0]], output_name(r), axes=[2, 3], keepdims=0)  # [batch, C]


def onnx_flatten(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("Flatten", [inputs[0]], output_name(r), axis=1)  # C, H, W order: the canonical one


def onnx_batchnorm(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    parts = [g.tensor(r, part) for part in ("weight", "bias", "running_mean", "running_var")]
    return g.node("BatchNormalization", [inputs[0], *parts], output_name(r), epsilon=float(r.layer.eps))


def onnx_dropout(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("Identity", [inputs[0]], output_name(r))  # inference: the identity


def onnx_add(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    total = inputs[0]
    for i, x in enumerate(inputs[1:], start=1):  # in the inputs' order, as the reference sums them
        total = g.node("Add", [total, x], output_name(r) if i == len(inputs) - 1 else f"{r.name}/sum{i}")
    return total


def onnx_layernorm(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("LayerNormalization", [inputs[0], g.tensor(r, "weight"), g.tensor(r, "bias")], output_name(r),
                  axis=-1, epsilon=float(r.layer.eps))


def onnx_tokens(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    c, h, w = r.input_shape  # [batch, C, H, W] -> [batch, C, H*W] -> [batch, H*W, C]
    flat = g.node("Reshape", [inputs[0], g.constant(f"{r.name}/shape", [0, c, h * w], np.int64)], f"{r.name}/flat")
    return g.node("Transpose", [flat], output_name(r), perm=[0, 2, 1])


def onnx_position_embedding(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("Add", [inputs[0], g.tensor(r, "weight")], output_name(r))  # [tokens, features] over every sample


def onnx_multihead_attention(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    t, d = r.input_shape
    heads = r.layer.heads
    hd = d // heads
    at = r.name
    qkv = g.linear(r, inputs[0], "in_proj_weight", "in_proj_bias", f"{at}/qkv", tokens=True)  # [batch, t, 3D]: q, k, v
    split = g.node("Reshape", [qkv, g.constant(f"{at}/qkv_shape", [0, t, 3, heads, hd], np.int64)], f"{at}/qkv_heads")
    stacked = g.node("Transpose", [split], f"{at}/qkv_stacked", perm=[2, 0, 3, 1, 4])  # [3, batch, heads, t, hd]
    q, k, v = (g.node("Gather", [stacked, g.constant(f"{at}/{part}_index", i, np.int64)], f"{at}/{part}", axis=0)
               for i, part in enumerate("qkv"))
    keys = g.node("Transpose", [k], f"{at}/k_t", perm=[0, 1, 3, 2])
    scores = g.node("MatMul", [q, keys], f"{at}/qk")
    scaled = g.node("Div", [scores, g.constant(f"{at}/sqrt_head_dim", math.sqrt(hd))], f"{at}/scores")
    weights = g.node("Softmax", [scaled], f"{at}/weights", axis=-1)  # over the keys
    per_head = g.node("MatMul", [weights, v], f"{at}/heads")  # [batch, heads, t, hd]
    by_token = g.node("Transpose", [per_head], f"{at}/heads_t", perm=[0, 2, 1, 3])
    merged = g.node("Reshape", [by_token, g.constant(f"{at}/merged_shape", [0, t, d], np.int64)], f"{at}/merged")
    return g.linear(r, merged, "out_proj.weight", "out_proj.bias", output_name(r), tokens=True)


def onnx_token_mean(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("ReduceMean", [inputs[0]], output_name(r), axes=[1], keepdims=0)  # [batch, features]


#: kind -> its ONNX function; a kind not here is refused by `build` (see UnsupportedKind)
ONNX_BUILDERS: dict[str, Callable[[ResolvedLayer, list[str], Graph], str]] = {
    "dense": onnx_dense,
    "conv2d": onnx_conv2d,
    "maxpool2d": onnx_maxpool2d,
    "flatten": onnx_flatten,
    "batchnorm": onnx_batchnorm,
    "dropout": onnx_dropout,
    "add": onnx_add,
    "avgpool2d": onnx_avgpool2d,
    "global_avgpool2d": onnx_global_avgpool2d,
    "layernorm": onnx_layernorm,
    "tokens": onnx_tokens,
    "position_embedding": onnx_position_embedding,
    "multihead_attention": onnx_multihead_attention,
    "token_mean": onnx_token_mean,
}


# -- activations: the nodes after a layer, over its output `x`, ending in `out` -------------------------
def gelu(g: Graph, x: str, out: str) -> str:
    """The exact form: 0.5 x (1 + erf(x / sqrt 2))."""
    erf = g.node("Erf", [g.node("Div", [x, g.constant(f"{out}/sqrt2", math.sqrt(2))], f"{out}/scaled")], f"{out}/erf")
    one_plus = g.node("Add", [erf, g.constant(f"{out}/one", 1.0)], f"{out}/one_plus")
    return g.node("Mul", [g.node("Mul", [x, g.constant(f"{out}/half", 0.5)], f"{out}/half_x"), one_plus], out)


def gelu_tanh(g: Graph, x: str, out: str) -> str:
    """The tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    cube = g.node("Mul", [g.node("Mul", [x, x], f"{out}/square"), x], f"{out}/cube")
    inner = g.node("Add", [x, g.node("Mul", [cube, g.constant(f"{out}/c", 0.044715)], f"{out}/cube_c")], f"{out}/inner")
    tanh = g.node("Tanh", [g.node("Mul", [inner, g.constant(f"{out}/sqrt_2_pi", math.sqrt(2 / math.pi))], f"{out}/scaled")], f"{out}/tanh")
    one_plus = g.node("Add", [tanh, g.constant(f"{out}/one", 1.0)], f"{out}/one_plus")
    return g.node("Mul", [g.node("Mul", [x, g.constant(f"{out}/half", 0.5)], f"{out}/half_x"), one_plus], out)


def unary(op: str) -> Callable[[Graph, str, str], str]:
    return lambda g, x, out: g.node(op, [x], out)


#: activation -> its nodes (every activation of weightrelay.layers.ACTIVATIONS but "none")
ONNX_ACTIVATIONS: dict[str, Callable[[Graph, str, str], str]] = {
    "relu": unary("Relu"), "tanh": unary("Tanh"), "sigmoid": unary("Sigmoid"), "gelu": gelu, "gelu_tanh": gelu_tanh,
}


def unsupported(model: ResolvedModel) -> list[str]:
    """The layers (as errors name them) whose kind has no ONNX function."""
    return [f"layer {i} ({r.kind} {r.name})" for i, r in enumerate(model.layers) if r.kind not in ONNX_BUILDERS]


def build(model: ResolvedModel, weights: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The model as ONNX, its weights in it; UnsupportedKind where a layer's kind has no function here.
    The result passes onnx's checker (with shape inference)."""
    missing = unsupported(model)
    if missing:
        kinds = sorted({r.kind for r in model.layers if r.kind not in ONNX_BUILDERS})
        raise UnsupportedKind(f"ONNX export does not support the kind(s) {', '.join(kinds)} ({'; '.join(missing)}); "
                              f"it supports {', '.join(ONNX_BUILDERS)}: export with --format safetensors, torch or keras instead")
    g = Graph(weights)
    outputs = {INPUT: INPUT}  # layer name -> the name of its output (after its activation) in the graph
    for r in model.layers:
        flow = ONNX_BUILDERS[r.kind](r, [outputs[source] for source in r.sources], g)  # the layers it takes, in order
        if r.layer.activation != "none":
            flow = ONNX_ACTIVATIONS[r.layer.activation](g, flow, f"{r.name}/{r.layer.activation}")
        outputs[r.name] = flow
    g.node("Identity", [outputs[model.layers[-1].name]], LOGITS)
    g.node("Softmax", [LOGITS], PROBABILITIES, axis=1)
    c, h, w = model.input_shape
    graph = helper.make_graph(
        g.nodes, model.spec.name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", model.num_classes]),
         helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", model.num_classes])],
        initializer=g.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="weightrelay",
                              doc_string=model.describe())
    # IR version of the opset, not the newest the installed onnx writes: older runtimes load it too
    proto.ir_version = min(proto.ir_version, 8)
    helper.set_model_props(proto, dict(metadata or {}))
    onnx.checker.check_model(proto, full_check=True)
    return proto
