"""Graphs (layers that name their inputs) and the kinds of residual networks and transformers: how specs
resolve and are refused, the built-ins, and their layouts proven against the numpy reference forward pass.

The channels-last side (Keras' and Flax's arrays) is computed here by an independent numpy forward pass in
that layout (N, H, W, C; attention with [D, heads, head_dim] kernels per projection and an [heads, head_dim, D]
output kernel, as keras.layers.MultiHeadAttention and flax.linen.MultiHeadDotProductAttention compute it), on
real images (scikit-learn's digits), and must equal `weightrelay.reference.forward` on the canonical tensors;
each conversion dropped or transposed (the q/k/v split, the head reshape, the output kernel) and each framework
default that the spec overrides (layernorm's eps, gelu's form) must break that equality.
"""

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from jax_service.layout import canonical_to_flax, flax_to_canonical
from keras_service.layout import canonical_to_keras, keras_to_canonical
from tests.unit.test_layout import digit_images, keras_conv, random_weights
from weightrelay import layouts, models, reference
from weightrelay.models import (
    Add, AvgPool2D, BatchNorm, Conv2D, Dense, Flatten, GlobalAvgPool2D, LayerNorm, MaxPool2D, ModelSpec, MultiHeadAttention,
    PositionEmbedding, SpecError, TokenMean, Tokens,
)
from weightrelay.v1 import worker_pb2 as pb

RNG = np.random.default_rng(19)


# -- an independent forward pass in the channels-last layout ----------------------------------------
def channels_last_attention(x, arrays, heads):
    """x [n, t, D]; arrays as Keras lists them: q, k, v kernels [D, heads, hd] and biases [heads, hd], output [heads, hd, D]."""
    qk, qb, kk, kb, vk, vb, ok, ob = arrays
    q, k, v = (np.einsum("ntd,dhk->nthk", x, kernel) + bias for kernel, bias in ((qk, qb), (kk, kb), (vk, vb)))
    scores = np.einsum("nthk,nshk->nhts", q, k) / math.sqrt(q.shape[-1])
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = scores / scores.sum(axis=-1, keepdims=True)
    return np.einsum("nhts,nshk,hkd->ntd", weights, v, ok) + ob


def channels_last_forward(model, layers, x_nchw, layernorm_eps=None, activations=None):
    """The model's logits from Keras' per-layer weight lists, computed in N, H, W, C; `layernorm_eps` and
    `activations` stand in a framework's defaults for the spec's values (to show that they matter)."""
    act = {**reference.ACTIVATIONS, **(activations or {})}
    outputs = {"input": x_nchw.transpose(0, 2, 3, 1).astype(np.float64)}
    for r in model.layers:
        layer, p = r.layer, [np.asarray(a, dtype=np.float64) for a in layers.get(r.name, [])]
        xs = [outputs[source] for source in r.sources]
        h = xs[0]
        if isinstance(layer, Conv2D):
            h = keras_conv(h, p[0], p[1], layer.stride, layer.padding)
        elif isinstance(layer, (MaxPool2D, AvgPool2D)):
            windows = sliding_window_view(h, (layer.size, layer.size), axis=(1, 2))[:, :: layer.step, :: layer.step]
            h = windows.max(axis=(4, 5)) if isinstance(layer, MaxPool2D) else windows.mean(axis=(4, 5))
        elif isinstance(layer, Flatten):
            h = h.reshape(len(h), -1)
        elif isinstance(layer, Dense):
            h = h @ p[0] + p[1]
        elif isinstance(layer, BatchNorm):
            h = (h - p[2]) / np.sqrt(p[3] + layer.eps) * p[0] + p[1]
        elif isinstance(layer, Add):
            h = sum(xs[1:], xs[0])
        elif isinstance(layer, GlobalAvgPool2D):
            h = h.mean(axis=(1, 2))
        elif isinstance(layer, LayerNorm):
            eps = layer.eps if layernorm_eps is None else layernorm_eps
            h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps) * p[0] + p[1]
        elif isinstance(layer, Tokens):
            h = h.reshape(len(h), -1, h.shape[-1])  # N, H*W, C
        elif isinstance(layer, PositionEmbedding):
            h = h + p[0]
        elif isinstance(layer, MultiHeadAttention):
            h = channels_last_attention(h, p, layer.heads)
        elif isinstance(layer, TokenMean):
            h = h.mean(axis=1)
        outputs[r.name] = act[layer.activation](h)
    return outputs[model.layers[-1].name]


def small_residual() -> ModelSpec:
    """A residual CNN written with named inputs: a projection shortcut with stride 2, an identity one, average pools."""
    return ModelSpec("small-residual", (
        Conv2D(6, 3, padding="same", name="stem"), BatchNorm(activation="relu", name="stem_bn"),
        Conv2D(8, 3, 2, "same", name="a"), BatchNorm(activation="relu", name="a_bn"), Conv2D(8, 3, padding="same", name="b"),
        Conv2D(8, 1, 2, "same", name="proj", inputs=("stem_bn",)),
        Add("relu", name="join", inputs=("b", "proj")),
        Conv2D(8, 3, padding="same", activation="tanh", name="c"), Add(name="join2", inputs=("c", "join")),
        AvgPool2D(2, name="avg"), GlobalAvgPool2D(name="gap"), Dense(0, name="head"),
    ))


def small_vit(eps: float = 1e-5) -> ModelSpec:
    """A transformer of 12 features in 3 heads, both gelu forms, dense on tokens, layernorm at `eps`."""
    return ModelSpec("small-vit", (
        Conv2D(12, 4, 4, name="patch"), Tokens(), PositionEmbedding(name="pos"),
        LayerNorm(eps, name="ln1"), MultiHeadAttention(3, name="attn"), Add(name="res1", inputs=("pos", "attn")),
        LayerNorm(eps, name="ln2"), Dense(20, "gelu", name="up"), Dense(12, "gelu_tanh", name="down"),
        Add(name="res2", inputs=("res1", "down")), LayerNorm(eps, name="ln3"), TokenMean(), Dense(0, name="head"),
    ))


def ones() -> ModelSpec:
    """Kernels with a dimension of 1 (a 1x1 conv of one channel, a dense layer of one unit): their transposes are
    contiguous views, which a conversion must still copy."""
    return ModelSpec("ones", (Conv2D(1, 1, name="one"), Flatten(), Dense(1, name="unit"), Dense(0, name="head")))


SPECS = {"ones": ones, "small-residual": small_residual, "small-vit": small_vit, "resnet20": lambda: models.builtin("resnet20"),
         "vit-tiny": lambda: models.builtin("vit-tiny")}


def weights_with_signal(model):
    """Random canonical weights scaled so that every layer's output keeps a signal (not saturated, not vanishing)."""
    weights = random_weights(model)
    for name, spec in model.manifest.items():
        if name.endswith("weight") and len(spec.shape) >= 2 and not name.endswith("pos.weight"):  # kernels: fan-in scaled
            array = RNG.standard_normal(spec.shape) / math.sqrt(np.prod(spec.shape[1:]))
        elif name.endswith("weight") and len(spec.shape) == 1:  # the norms' scales
            array = 1 + 0.1 * RNG.standard_normal(spec.shape)
        elif name.endswith(("bias", "running_mean")):
            array = 0.05 * RNG.standard_normal(spec.shape)
        else:
            continue
        weights[name] = array.astype(np.float32)
    return weights


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("channels", [1, 3])
def test_the_channels_last_layouts_compute_the_reference_forward_pass(name, channels):
    x = digit_images(channels, count=6)
    model = models.resolve(SPECS[name](), x.shape[1:], 10)
    weights = weights_with_signal(model)
    expected = reference.forward(model, weights, x)
    assert np.abs(expected).max() > 1e-2 and expected.std(axis=0).max() > 1e-3  # a real signal that depends on the input
    np.testing.assert_allclose(channels_last_forward(model, canonical_to_keras(weights, model), x), expected, rtol=1e-9, atol=1e-9)
    params, stats = canonical_to_flax(weights, model)
    as_lists = {}
    for r in model.layers:  # Flax's trees read back into Keras' order, to compute with the same forward pass
        if isinstance(r.layer, MultiHeadAttention):
            as_lists[r.name] = [params[r.name][p][leaf] for p in ("query", "key", "value", "out") for leaf in ("kernel", "bias")]
        elif isinstance(r.layer, (LayerNorm,)):
            as_lists[r.name] = [params[r.name]["scale"], params[r.name]["bias"]]
        elif isinstance(r.layer, PositionEmbedding):
            as_lists[r.name] = [params[r.name]["embedding"]]
        elif isinstance(r.layer, BatchNorm):
            as_lists[r.name] = [params[r.name]["scale"], params[r.name]["bias"], stats[r.name]["mean"], stats[r.name]["var"]]
        elif r.params:
            as_lists[r.name] = [params[r.name]["kernel"], params[r.name]["bias"]]
    np.testing.assert_allclose(channels_last_forward(model, as_lists, x), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SPECS)
def test_the_new_layouts_round_trip_bit_exactly(name):
    model = models.resolve(SPECS[name](), (3, 28, 28), 10)
    weights = weights_with_signal(model)
    for back in (keras_to_canonical(canonical_to_keras(weights, model), model), flax_to_canonical(*canonical_to_flax(weights, model), model)):
        assert list(back) == list(weights)
        for key in weights:
            assert back[key].tobytes() == weights[key].tobytes() and back[key].flags.c_contiguous, key


def _arrays(tree):
    """Every array of a layer list, a tree of dicts, or a weight set."""
    if isinstance(tree, dict):
        return [a for value in tree.values() for a in _arrays(value)]
    if isinstance(tree, (list, tuple)):
        return [a for value in tree for a in _arrays(value)]
    return [tree]


@pytest.mark.parametrize("name", SPECS)
def test_no_conversion_hands_back_memory_of_its_input(name):
    """The worker reuses a received set's memory for the next one, and TensorFlow may keep the very array it is
    assigned: every converted array must be fresh memory, in both directions."""
    model = models.resolve(SPECS[name](), (3, 28, 28), 10)
    weights = weights_with_signal(model)
    for to, back in ((canonical_to_keras, keras_to_canonical), (canonical_to_flax, lambda trees, m: flax_to_canonical(*trees, m))):
        converted = to(weights, model)
        for array in _arrays(converted):
            assert not any(np.shares_memory(array, w) for w in weights.values()), name
        returned = back(converted, model)
        for array in returned.values():
            assert not any(np.shares_memory(array, c) for c in _arrays(converted)), name


def _wrong_heads(kernel, bias):
    """The head reshape left out: features grouped [hd, heads] instead of [heads, hd]."""
    d, heads, hd = kernel.shape
    return kernel.reshape(d, d).reshape(d, hd, heads).transpose(0, 2, 1), bias.reshape(d).reshape(hd, heads).T


def _break(lists, name, how):
    qk, qb, kk, kb, vk, vb, ok, ob = lists[name]
    if how == "q/k/v split":  # q and k taken from each other's rows of in_proj_weight
        lists[name] = [kk, kb, qk, qb, vk, vb, ok, ob]
    elif how == "head reshape":
        lists[name] = [*_wrong_heads(qk, qb), *_wrong_heads(kk, kb), *_wrong_heads(vk, vb), ok, ob]
    elif how == "output kernel":  # out_proj.weight reshaped without its transpose
        d = ok.shape[2]
        lists[name] = [qk, qb, kk, kb, vk, vb, ok.reshape(d, d).T.reshape(ok.shape), ob]


@pytest.mark.parametrize("how", ["q/k/v split", "head reshape", "output kernel", "layernorm eps", "gelu form"])
def test_each_conversion_and_each_stated_default_matters(how):
    """Each conversion dropped or transposed, or a framework's own default in place of the spec's value (Keras'
    layernorm eps 1e-3; Flax's gelu, the tanh form), gives other logits: the equality above would catch it."""
    x = digit_images(3, count=6)
    model = models.resolve(small_vit(), x.shape[1:], 10)
    weights = weights_with_signal(model)
    expected = reference.forward(model, weights, x)
    lists = canonical_to_keras(weights, model)
    options = {}
    if how == "layernorm eps":
        options["layernorm_eps"] = 1e-3
    elif how == "gelu form":
        options["activations"] = {"gelu": reference.ACTIVATIONS["gelu_tanh"]}
    else:
        _break(lists, "attn", how)
    wrong = channels_last_forward(model, lists, x, **options)
    assert np.abs(wrong - expected).max() > 1e-6, how  # far beyond the 1e-9 the right conversion reaches
    np.testing.assert_allclose(channels_last_forward(model, canonical_to_keras(weights, model), x), expected, rtol=1e-9, atol=1e-9)


def test_attention_conversions_split_q_k_v_and_heads_as_pytorch_packs_them():
    d, heads = 6, 3
    weight, bias = RNG.standard_normal((3 * d, d)), RNG.standard_normal(3 * d)
    (qk, qb), (kk, kb), (vk, vb) = layouts.qkv_to_heads(weight, bias, heads)
    assert qk.shape == (d, heads, 2) and qb.shape == (heads, 2)
    # key kernel [i, h, j] is row d + 2h + j, column i of in_proj_weight; value bias [h, j] is entry 2d + 2h + j
    assert kk[4, 1, 0] == weight[d + 2, 4] and vb[2, 1] == bias[2 * d + 5]
    back_w, back_b = layouts.qkv_from_heads([(qk, qb), (kk, kb), (vk, vb)])
    assert np.array_equal(back_w, weight) and np.array_equal(back_b, bias)
    out = RNG.standard_normal((d, d))
    kernel = layouts.out_to_heads(out, heads)
    assert kernel.shape == (heads, 2, d) and kernel[1, 1, 5] == out[5, 3]  # input feature 2h + j, output feature 5
    assert np.array_equal(layouts.out_from_heads(kernel), out)


def test_the_reference_gelu_forms_and_layernorm():
    x = np.linspace(-4, 4, 81)
    exact = reference.ACTIVATIONS["gelu"](x)
    assert exact[40] == 0 and abs(exact[60] - 2 * 0.5 * (1 + math.erf(2 / math.sqrt(2)))) < 1e-15
    assert 1e-4 < np.abs(exact - reference.ACTIVATIONS["gelu_tanh"](x)).max() < 1e-2  # close, and not the same
    rows = RNG.standard_normal((4, 5)) * 3 + 1
    normed = reference.layernorm(rows, np.ones(5), np.zeros(5), 0.0)
    np.testing.assert_allclose(normed.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(normed.var(-1), 1, atol=1e-12)


def test_the_reference_attention_with_one_token_is_the_value_projection_then_the_output():
    """Softmax over one key is 1: the output is out(v(x)), whatever q and k are."""
    d = 4
    x = RNG.standard_normal((2, 1, d))
    weight, bias, out_w, out_b = RNG.standard_normal((3 * d, d)), RNG.standard_normal(3 * d), RNG.standard_normal((d, d)), RNG.standard_normal(d)
    v = x @ weight[2 * d:].T + bias[2 * d:]
    np.testing.assert_allclose(reference.attention(x, weight, bias, out_w, out_b, heads=2), v @ out_w.T + out_b, rtol=1e-12)


# -- resolution: graphs, built-ins, refusals ------------------------------------------------
def test_builtins_resnet20_and_vit_tiny():
    resnet = models.resolve(models.builtin("resnet20"), (3, 32, 32), 10)
    assert 0.26e6 < resnet.parameter_count < 0.28e6
    assert sum(r.kind == "conv2d" for r in resnet.layers) == 21 and sum(r.kind == "add" for r in resnet.layers) == 9
    assert {r.name: r.output_shape for r in resnet.layers}["s3b3_add"] == (64, 8, 8)
    assert next(r for r in resnet.layers if r.name == "s2b1_add").sources == ("s2b1_bn2", "s2b1_proj_bn")
    assert models.resolve(models.builtin("resnet20"), (1, 28, 28), 10).layers[-2].input_shape == (64, 7, 7)
    mnist = models.resolve(models.builtin("vit-tiny"), (1, 28, 28), 10)
    cifar = models.resolve(models.builtin("vit-tiny"), (3, 32, 32), 10)
    assert mnist.manifest["patch.weight"].shape == (64, 1, 7, 7) and mnist.manifest["pos.weight"].shape == (16, 64)
    assert cifar.manifest["patch.weight"].shape == (64, 3, 4, 4) and cifar.manifest["pos.weight"].shape == (64, 64)
    assert mnist.manifest["block2_attn.in_proj_weight"].shape == (192, 64) and mnist.manifest["block1_mlp1.weight"].shape == (128, 64)
    assert [r.layer.activation for r in mnist.layers if r.name.endswith("mlp1")] == ["gelu", "gelu"]
    assert "block1_add1 add (pos + block1_attn) [16x64]" in mnist.describe()


@pytest.mark.parametrize("name", ["resnet20", "vit-tiny"])
def test_the_builtins_written_out_in_docs_are_the_builtins(name):
    from tests.support import REPO

    spec = models.load_model(str(REPO / "docs" / "models" / f"{name}.toml"))
    assert spec.layers == models.builtin(name).layers


#: a residual block as a user writes it (also relayed by tests/e2e/test_graphs.py)
RESIDUAL_TOML = """
name = "hand-written-residual"
[[layers]]
kind = "conv2d"
filters = 8
padding = "same"
[[layers]]
kind = "batchnorm"
activation = "relu"
name = "entry"
[[layers]]
kind = "conv2d"
filters = 8
padding = "same"
[[layers]]
kind = "batchnorm"
[[layers]]
kind = "add"
inputs = ["bn2", "entry"]
activation = "relu"
[[layers]]
kind = "maxpool2d"
[[layers]]
kind = "flatten"
[[layers]]
kind = "dense"
units = "classes"
"""


def test_a_residual_block_written_by_hand_in_toml(tmp_path):
    path = tmp_path / "block.toml"
    path.write_text(RESIDUAL_TOML)
    spec = models.load_model(str(path))
    model = models.resolve(spec, (1, 28, 28), 10)
    assert [r.sources for r in model.layers] == [("input",), ("conv1",), ("entry",), ("conv2",), ("bn2", "entry"), ("add1",),
                                                 ("pool1",), ("flatten1",)]
    assert models.spec_from_dict(models.spec_to_dict(spec)) == spec == models.from_proto(models.to_proto(spec))
    assert models.spec_to_dict(spec)["layers"][4]["inputs"] == ["bn2", "entry"] and "inputs" not in models.spec_to_dict(spec)["layers"][0]


@pytest.mark.parametrize("layers,message", [
    ((Conv2D(8, 3, padding="same", name="a"), Conv2D(4, 3, padding="same", name="b"), Add(name="sum", inputs=("a", "b")), Flatten(), Dense(0)),
     "layer 2 (add sum): its inputs disagree in shape: a gives [8, 28, 28], b gives [4, 28, 28]"),
    ((Flatten(), Dense(8, name="x"), Add(inputs=("x",)), Dense(0)), "add takes two or more inputs, got 1"),
    ((Flatten(), Dense(8, name="x", inputs=("nope",)), Dense(0)), "layer 1 (dense x): input 'nope' names no layer; name one of the earlier layers (input, flatten1)"),
    ((Flatten(name="f"), Dense(8, name="x", inputs=("y",)), Dense(10, name="y", inputs=("f",))),
     "layer 1 (dense x): input 'y' is layer 2, which comes later; a layer takes only earlier layers' outputs, so move 'y' before it"),
    ((Flatten(name="f"), Dense(8, name="x", inputs=("y",)), Dense(8, name="y"), Dense(0, inputs=("x",))),
     "layer 1 (dense x): its inputs make a cycle (x -> y -> x)"),
    ((Flatten(name="f"), Dense(8, name="x", inputs=("x",)), Dense(0)), "its inputs make a cycle (x -> x)"),
    ((Flatten(name="f"), Dense(8, name="unused"), Dense(0, inputs=("f",))), "layer 1 (dense unused): no later layer takes its output"),
    ((Flatten(), Tokens(), Dense(0)), "tokens needs (C, H, W) input, got [784]; put it after a conv2d"),
    ((Conv2D(10, 4, 4), Tokens(), MultiHeadAttention(4, name="attn"), TokenMean(), Dense(0)),
     "layer 2 (multihead_attention attn): 4 heads do not divide the 10 features; use heads = one of 1, 2, 5, 10"),
    ((Conv2D(8, 4, 4), Tokens(), BatchNorm(), TokenMean(), Dense(0)), "batchnorm on tokens [49, 8]"),
    ((Conv2D(8, 4, 4), LayerNorm(), Flatten(), Dense(0)), "layernorm needs tokens or flat features, got [8, 7, 7]"),
    ((Flatten(), PositionEmbedding(), Dense(0)), "position_embedding needs tokens (tokens, features), got [784]"),
    ((Flatten(), MultiHeadAttention(2), Dense(0)), "multihead_attention needs tokens (tokens, features), got [784]"),
    ((Conv2D(4, 3, name="input"), Flatten(), Dense(0)), "the name 'input' means the model's input"),
    ((Conv2D(4, 3), Flatten(), Dense(4, name="d"), Add(inputs=("d", "flatten1")), Dense(0)), "its inputs disagree in shape: d gives [4], flatten1 gives [2704]"),
])
def test_misused_graphs_and_kinds_are_refused_naming_the_layer_and_the_fix(layers, message):
    with pytest.raises(SpecError) as info:
        models.resolve(ModelSpec("x", layers), (1, 28, 28), 10)
    assert message in str(info.value)


def test_inputs_that_are_not_a_list_of_names_are_refused():
    with pytest.raises(SpecError, match="inputs must be a list of layer names"):
        models.spec_from_dict({"layers": [{"kind": "flatten"}, {"kind": "add", "inputs": "flatten1"}]})
    with pytest.raises(SpecError, match="input 'bad name' is not a layer name"):
        models.from_proto(pb.ModelSpec(name="x", layers=[pb.LayerSpec(flatten=pb.FlattenLayer(), inputs=["bad name"]), pb.LayerSpec(dense=pb.DenseLayer())]))


def test_a_layernorm_eps_of_0_on_the_wire_is_the_default_and_every_stated_one_travels():
    assert models.from_proto(models.to_proto(ModelSpec("x", (LayerNorm(),)))).layers[0].eps == 1e-5
    assert models.from_proto(models.to_proto(ModelSpec("x", (LayerNorm(1e-3),)))).layers[0].eps == 1e-3
