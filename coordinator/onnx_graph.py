"""A resolved model spec and its canonical weights as an ONNX model: a pure function, no framework.

The canonical layout is ONNX's own (activations N, C, H, W; a flatten orders features C, H, W;
dense weights [out, in]; convolution weights OIHW), so every tensor goes in as it is: dense is
Gemm with transB=1, conv2d is Conv with the resolved padding (TensorFlow's SAME spelled out as
begin/end pads), maxpool2d MaxPool, flatten Flatten, batchnorm BatchNormalization in inference
mode (the running statistics), dropout Identity. The graph takes `input` float32 [batch, C, H, W]
and gives `logits` [batch, classes] and `probabilities` (their softmax), as a worker computes them.

`ONNX_BUILDERS` holds one function per kind. A kind without one is refused, naming the kind, so a
kind added to `weightrelay.layers` later exports once its function is added here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from weightrelay.models import ResolvedLayer, ResolvedModel

#: The opset the graph is written for: every operator used here has had its current form since before it,
#: and every onnxruntime of the last years runs it.
OPSET = 17
INPUT, LOGITS, PROBABILITIES = "input", "logits", "probabilities"
ACTIVATION_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


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


# -- one function per kind: its nodes over its input(s), returning the name of its output (before the activation)
def onnx_dense(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("Gemm", [inputs[0], g.tensor(r, "weight"), g.tensor(r, "bias")], r.name, transB=1)


def onnx_conv2d(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    top, bottom, left, right = r.padding
    k, s = r.layer.kernel, r.layer.stride
    return g.node("Conv", [inputs[0], g.tensor(r, "weight"), g.tensor(r, "bias")], r.name,
                  kernel_shape=[k, k], strides=[s, s], pads=[top, left, bottom, right])


def onnx_maxpool2d(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    size, step = r.layer.size, r.layer.step
    return g.node("MaxPool", [inputs[0]], r.name, kernel_shape=[size, size], strides=[step, step])


def onnx_flatten(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("Flatten", [inputs[0]], r.name, axis=1)  # C, H, W order: the canonical one


def onnx_batchnorm(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    parts = [g.tensor(r, part) for part in ("weight", "bias", "running_mean", "running_var")]
    return g.node("BatchNormalization", [inputs[0], *parts], r.name, epsilon=float(r.layer.eps))


def onnx_dropout(r: ResolvedLayer, inputs: list[str], g: Graph) -> str:
    return g.node("Identity", [inputs[0]], r.name)  # inference: the identity


#: kind -> its ONNX function; a kind not here is refused by `build` (see UnsupportedKind)
ONNX_BUILDERS: dict[str, Callable[[ResolvedLayer, list[str], Graph], str]] = {
    "dense": onnx_dense,
    "conv2d": onnx_conv2d,
    "maxpool2d": onnx_maxpool2d,
    "flatten": onnx_flatten,
    "batchnorm": onnx_batchnorm,
    "dropout": onnx_dropout,
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
    flow = INPUT
    for r in model.layers:
        flow = ONNX_BUILDERS[r.kind](r, [flow], g)  # each layer takes the output of the one before (as models.resolve)
        if r.layer.activation != "none":
            flow = g.node(ACTIVATION_OPS[r.layer.activation], [flow], f"{r.name}_{r.layer.activation}")
    g.node("Identity", [flow], LOGITS)
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
