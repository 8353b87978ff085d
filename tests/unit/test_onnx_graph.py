"""The ONNX graph of every layer kind and every built-in, scored by onnxruntime against the numpy reference
forward pass (`weightrelay.reference.forward`) on real images (scikit-learn's digits).

The weights are random but scaled by each tensor's fan-in, so that the logits stay near 1 and an absolute
tolerance of 1e-5 means what it says (with unscaled weights a ResNet's logits reach the hundreds, where float32
alone differs by more). Each kind the residual networks and transformers brought (add, avgpool2d,
global_avgpool2d, layernorm, tokens, position_embedding, multihead_attention, token_mean, dense on tokens,
gelu and gelu_tanh) is also checked alone in a tiny spec, so that a difference names its kind.
"""

import math

import numpy as np
import pytest

from tests.unit.test_layout import digit_images
from weightrelay import models, reference
from weightrelay.layers import ACTIVATIONS, KINDS
from weightrelay.models import (
    Add, AvgPool2D, Conv2D, Dense, Flatten, GlobalAvgPool2D, LayerNorm, ModelSpec, MultiHeadAttention,
    PositionEmbedding, TokenMean, Tokens,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from coordinator import onnx_graph  # noqa: E402  (needs onnx)

TOLERANCE = 1e-5


def scaled_weights(model: models.ResolvedModel, seed: int = 23) -> dict[str, np.ndarray]:
    """Seeded random weights: a matrix or kernel N(0, 1 / fan-in), a vector N(0, 0.3^2) (a norm's scale 1 + that),
    a running variance positive."""
    rng = np.random.default_rng(seed)
    weights = {}
    for r in model.layers:
        for spec in r.params:
            part = r.part(spec)
            if len(spec.shape) >= 2:
                array = rng.standard_normal(spec.shape) / math.sqrt(math.prod(spec.shape[1:]))
            else:
                array = rng.standard_normal(spec.shape) * 0.3
            if part == "running_var":
                array = np.abs(array) + 0.5
            elif part == "weight" and r.kind in ("batchnorm", "layernorm"):
                array = array + 1.0
            weights[spec.name] = array.astype(np.float32)
    return weights


def images(shape: tuple[int, int, int], count: int = 40) -> np.ndarray:
    """Real digits [count, C, H, W] at `shape`: 24x24 digits in up to 4 channel variants, zero-padded to H, W."""
    c, h, w = shape
    x = digit_images(channels=c, count=count)
    top, left = (h - x.shape[2]) // 2, (w - x.shape[3]) // 2
    return np.pad(x, ((0, 0), (0, 0), (top, h - x.shape[2] - top), (left, w - x.shape[3] - left))).astype(np.float32)


def scored(model: models.ResolvedModel, weights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's logits and probabilities of the model's ONNX graph."""
    proto = onnx_graph.build(model, weights)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(session.run([onnx_graph.LOGITS, onnx_graph.PROBABILITIES], {onnx_graph.INPUT: x}))


def differences(model: models.ResolvedModel, weights, x: np.ndarray) -> tuple[float, float, int]:
    """max |logits - reference|, max |probabilities - softmax(reference)|, and how many predictions differ."""
    logits, probabilities = scored(model, weights, x)
    expected = reference.forward(model, weights, x)
    softmax = np.exp(expected - expected.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    differing = int((logits.argmax(1) != expected.argmax(1)).sum())
    return float(np.abs(logits - expected).max()), float(np.abs(probabilities - softmax).max()), differing


def assert_as_the_reference(spec: ModelSpec, shape: tuple[int, int, int]) -> None:
    model = models.resolve(spec, shape, 10)
    weights = scaled_weights(model)
    x = images(shape)
    dl, dp, differing = differences(model, weights, x)
    assert dl <= TOLERANCE and dp <= TOLERANCE and differing == 0, f"{spec.name}: max |dlogits| {dl:.2e}, max |dp| {dp:.2e}, {differing} differ"


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", sorted(models.BUILTINS))
def test_every_built_in_exports_and_computes_what_the_reference_does(name, shape):
    assert_as_the_reference(models.builtin(name), shape)


def test_every_kind_and_activation_has_its_onnx_nodes():
    assert set(onnx_graph.ONNX_BUILDERS) == set(KINDS)
    assert set(onnx_graph.ONNX_ACTIVATIONS) == set(ACTIVATIONS) - {"none"}


#: One tiny spec per kind (or form) the residual networks and transformers brought; its name is the kind it checks.
ONE_KIND = [
    # three inputs, one of them the model's input through a layer of its own; the sum in order, then its activation
    ModelSpec("add", (Conv2D(4, 3, padding="same", name="a"), Conv2D(4, 1, name="b", inputs=("input",)),
                      Conv2D(4, 5, padding="same", name="c", inputs=("input",)), Add("relu", inputs=("a", "b", "c")),
                      Flatten(), Dense(0))),
    # a window of 3 every 2 over 24: the last row and column left over, never padded
    ModelSpec("avgpool2d", (Conv2D(3, 3, activation="tanh"), AvgPool2D(3, 2), Flatten(), Dense(0))),
    ModelSpec("global_avgpool2d", (Conv2D(5, 3, activation="relu"), GlobalAvgPool2D(), Dense(0))),
    ModelSpec("layernorm-features", (Flatten(), Dense(16), LayerNorm(1e-2), Dense(0))),
    ModelSpec("layernorm-tokens", (Conv2D(6, 4, 4), Tokens(), LayerNorm(0.5), Flatten(), Dense(0))),
    # a flatten of the tokens reads them token by token: the patches' order and each token's features
    ModelSpec("tokens", (Conv2D(6, 4, 4), Tokens(), Flatten(), Dense(0))),
    ModelSpec("position_embedding", (Conv2D(6, 4, 4), Tokens(), PositionEmbedding(), Flatten(), Dense(0))),
    *(ModelSpec(f"multihead_attention-{heads}", (Conv2D(12, 4, 4), Tokens(), MultiHeadAttention(heads), Flatten(), Dense(0)))
      for heads in (1, 3, 12)),
    ModelSpec("token_mean", (Conv2D(6, 4, 4, activation="relu"), Tokens(), TokenMean(), Dense(0))),
    ModelSpec("dense-tokens", (Conv2D(6, 4, 4), Tokens(), Dense(10, "relu"), Dense(7), Flatten(), Dense(0))),
    ModelSpec("gelu", (Flatten(), Dense(16, "gelu"), Dense(0))),
    ModelSpec("gelu_tanh", (Flatten(), Dense(16, "gelu_tanh"), Dense(0))),
    ModelSpec("gelu-tokens", (Conv2D(6, 4, 4, activation="gelu"), Tokens(), Dense(8, "gelu_tanh"), Flatten(), Dense(0))),
]


@pytest.mark.parametrize("spec", ONE_KIND, ids=lambda s: s.name)
def test_each_kind_alone_computes_what_the_reference_does(spec):
    assert_as_the_reference(spec, (3, 24, 24))


def test_the_tiny_specs_cover_every_kind_and_activation():
    kinds = {layer.kind for spec in ONE_KIND for layer in spec.layers}
    activations = {layer.activation for spec in ONE_KIND for layer in spec.layers}
    assert kinds >= set(KINDS) - {"maxpool2d", "batchnorm", "dropout"}  # those: EVERY_OPTION in tests/unit/test_export.py
    assert activations >= set(ACTIVATIONS) - {"sigmoid"}


def test_the_tolerance_tells_the_gelu_forms_and_layernorm_eps_apart(monkeypatch):
    """The forms and the eps differ by far more than the tolerance here, so the tests above would catch a swap."""
    gelu = next(spec for spec in ONE_KIND if spec.name == "gelu")
    model = models.resolve(gelu, (3, 24, 24), 10)
    weights, x = scaled_weights(model), images((3, 24, 24))
    monkeypatch.setitem(onnx_graph.ONNX_ACTIVATIONS, "gelu", onnx_graph.gelu_tanh)
    assert differences(model, weights, x)[0] > 10 * TOLERANCE
    monkeypatch.undo()
    norm = next(spec for spec in ONE_KIND if spec.name == "layernorm-tokens")
    model = models.resolve(norm, (3, 24, 24), 10)
    weights, x = scaled_weights(model), images((3, 24, 24))
    builds = onnx_graph.ONNX_BUILDERS["layernorm"]
    monkeypatch.setitem(onnx_graph.ONNX_BUILDERS, "layernorm", lambda r, inputs, g: builds(
        models.ResolvedLayer(LayerNorm(1e-5, name=r.name), r.inputs, r.output, r.params), inputs, g))
    assert differences(model, weights, x)[0] > 10 * TOLERANCE


def test_the_graph_follows_named_inputs_and_holds_only_the_weights():
    """resnet20's shortcuts take the block's input, not the layer before; the initializers are the wire's tensors, in order."""
    model = models.resolve(models.builtin("resnet20"), (1, 28, 28), 10)
    proto = onnx_graph.build(model, scaled_weights(model))
    assert [t.name for t in proto.graph.initializer] == list(model.manifest)
    node = {n.output[0]: n for n in proto.graph.node}
    assert list(node["s2b1_proj"].input[:1]) == ["s1b3_add/relu"] and list(node["s2b1_add"].input) == ["s2b1_bn2", "s2b1_proj_bn"]
    assert list(node["s1b1_add"].input) == ["s1b1_bn2", "stem_bn/relu"]


def test_layers_named_as_the_graph_outputs_keep_them_apart():
    spec = ModelSpec("clash", (Flatten(), Dense(16, "gelu", name="logits"), Dense(0, name="probabilities")))
    assert_as_the_reference(spec, (1, 24, 24))

