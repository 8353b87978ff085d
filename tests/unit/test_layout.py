"""Canonical <-> Keras layouts, proven against the numpy reference forward pass.

The Keras side is computed here by an independent numpy forward pass in Keras' own layout
(N, H, W, C activations, HWIO kernels, [in, out] dense kernels, a flatten in H, W, C order),
on real images (scikit-learn's digits), and must equal `weightrelay.reference.forward` on the
canonical tensors. A conversion that is only a round trip would pass a round-trip test while
computing something else; these tests catch that.
"""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.datasets import load_digits

from jax_service.layout import canonical_to_flax, flax_into_canonical
from keras_service.layout import canonical_to_keras, keras_into_canonical, keras_to_canonical
from weightrelay.buffers import ALIGNMENT
from weightrelay.layouts import conv_from_hwio, conv_to_hwio, dense_from_in_out, dense_to_in_out
from weightrelay import layouts, models, reference, transpose
from weightrelay.models import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec

RNG = np.random.default_rng(7)


def digit_images(channels: int = 3, count: int = 40) -> np.ndarray:
    """Real 8x8 digits, scaled up to 24x24, as `channels` different channels: [n, C, 24, 24]."""
    digits = load_digits().images[:count] / 16.0
    big = np.kron(digits, np.ones((3, 3)))
    variants = [big, big.transpose(0, 2, 1), 1.0 - big, np.roll(big, 3, axis=2)]
    return np.stack(variants[:channels], axis=1)


def random_weights(model: models.ResolvedModel) -> dict[str, np.ndarray]:
    weights = {}
    for name, spec in model.manifest.items():
        array = RNG.standard_normal(spec.shape) * 0.3
        if name.endswith("running_var"):
            array = np.abs(array) + 0.5
        weights[name] = array.astype(np.float32)
    return weights


# -- Keras' layout, computed independently in numpy --------------------------------------
def keras_conv(x, kernel, bias, stride, padding):
    """x [n, h, w, c], kernel [kh, kw, in, out] (HWIO), TensorFlow's SAME or VALID."""
    kh, kw = kernel.shape[:2]
    if padding == "same":
        top, bottom = models.same_padding(x.shape[1], kh, stride)
        left, right = models.same_padding(x.shape[2], kw, stride)
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # n, oh, ow, c, kh, kw
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias


def keras_forward(model: models.ResolvedModel, layers: dict[str, list[np.ndarray]], x_nchw: np.ndarray) -> np.ndarray:
    act = reference.ACTIVATIONS
    h = x_nchw.transpose(0, 2, 3, 1).astype(np.float64)  # N, H, W, C
    for r in model.layers:
        layer, params = r.layer, [np.asarray(p, dtype=np.float64) for p in layers.get(r.name, [])]
        if isinstance(layer, Conv2D):
            h = act[layer.activation](keras_conv(h, params[0], params[1], layer.stride, layer.padding))
        elif isinstance(layer, MaxPool2D):
            s = layer.stride or layer.size
            h = sliding_window_view(h, (layer.size, layer.size), axis=(1, 2))[:, ::s, ::s].max(axis=(4, 5))
        elif isinstance(layer, Flatten):
            h = h.reshape(len(h), -1)  # H, W, C order
        elif isinstance(layer, Dense):
            h = act[layer.activation](h @ params[0] + params[1])
        elif isinstance(layer, BatchNorm):
            gamma, beta, mean, var = params
            h = act[layer.activation]((h - mean) / np.sqrt(var + layer.eps) * gamma + beta)
    return h


SMALL_LENET = ModelSpec("small-lenet", (
    Conv2D(6, 5, padding="same", activation="relu"), MaxPool2D(2),
    Conv2D(16, 3, stride=2, padding="same", activation="tanh"), MaxPool2D(2, 1),
    Flatten(), Dropout(0.5), Dense(24, "sigmoid"), Dense(0),
))
SPECS = {
    "mlp": models.builtin("mlp"),
    "lenet": models.builtin("lenet"),
    "cnn-bn": models.builtin("cnn-bn"),
    "small-lenet (stride 2, odd SAME padding, tanh, sigmoid)": SMALL_LENET,
}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("channels", [1, 3])
def test_keras_layout_computes_the_reference_forward_pass(name, channels):
    x = digit_images(channels)
    model = models.resolve(SPECS[name], x.shape[1:], 10)
    weights = random_weights(model)
    expected = reference.forward(model, weights, x)
    got = keras_forward(model, canonical_to_keras(weights, model), x)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert np.abs(expected).max() > 1e-3  # a real signal, not zeros


@pytest.mark.parametrize("name", SPECS)
def test_round_trip_is_bit_exact_and_contiguous(name):
    model = models.resolve(SPECS[name], (3, 24, 24), 10)
    weights = random_weights(model)
    back = keras_to_canonical(canonical_to_keras(weights, model), model)
    assert back.keys() == weights.keys()
    for key in weights:
        assert back[key].tobytes() == weights[key].tobytes() and back[key].flags.c_contiguous, key


def test_leaving_out_the_flatten_permutation_breaks_the_forward_pass():
    """Keras flattens H, W, C: a plain transpose of the first dense kernel after a flatten is wrong."""
    x = digit_images(3)
    model = models.resolve(models.builtin("lenet"), x.shape[1:], 10)
    fc1 = next(r for r in model.layers if r.name == "fc1")
    assert fc1.flattened_from == (16, 4, 4)
    weights = random_weights(model)
    layers = canonical_to_keras(weights, model)
    right = keras_forward(model, layers, x)
    layers["fc1"][0] = np.ascontiguousarray(weights["fc1.weight"].T)  # no permutation
    wrong = keras_forward(model, layers, x)
    assert np.abs(right - wrong).max() > 1e-2
    np.testing.assert_allclose(right, reference.forward(model, weights, x), rtol=1e-9, atol=1e-9)


def test_dense_kernel_functions_are_inverse_and_transpose_without_a_flatten():
    weight = RNG.standard_normal((5, 2 * 3 * 4)).astype(np.float32)
    assert np.array_equal(dense_to_in_out(weight), weight.T)
    permuted = dense_to_in_out(weight, (2, 3, 4))
    assert permuted.shape == (24, 5)
    # row h*W*C + w*C + c of the Keras kernel is canonical column c*H*W + h*W + w
    assert np.array_equal(permuted[1 * 4 * 2 + 3 * 2 + 1], weight[:, 1 * 12 + 1 * 4 + 3])
    assert np.array_equal(dense_from_in_out(permuted, (2, 3, 4)), weight)


def test_conv_kernel_is_hwio_in_keras():
    weight = RNG.standard_normal((4, 3, 5, 2)).astype(np.float32)  # out, in, kh, kw
    kernel = conv_to_hwio(weight)
    assert kernel.shape == (5, 2, 3, 4) and kernel[1, 0, 2, 3] == weight[3, 2, 1, 0]
    assert np.array_equal(conv_from_hwio(kernel), weight)


def test_the_reference_convolution_matches_its_definition():
    x = digit_images(2, count=3)[:, :, :7, :6]
    weight = RNG.standard_normal((3, 2, 3, 3))
    bias = RNG.standard_normal(3)
    got = reference.conv2d_nchw(x, weight, bias, stride=2, padding=(0, 1, 1, 1))
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (1, 1)))
    expected = np.zeros((3, 3, 3, 3))
    for n in range(3):
        for o in range(3):
            for i in range(3):
                for j in range(3):
                    expected[n, o, i, j] = (padded[n, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] * weight[o]).sum() + bias[o]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_batchnorm_uses_the_running_statistics():
    model = models.resolve(ModelSpec("bn", (Flatten(), BatchNorm(eps=1e-3), Dense(0))), (1, 2, 2), 4)
    weights = random_weights(model)
    x = digit_images(1, count=5)[:, :, :2, :2]
    flat = x.reshape(5, 4)
    normed = (flat - weights["bn1.running_mean"]) / np.sqrt(weights["bn1.running_var"].astype(np.float64) + 1e-3)
    normed = normed * weights["bn1.weight"] + weights["bn1.bias"]
    expected = normed @ weights["fc1.weight"].T.astype(np.float64) + weights["fc1.bias"]
    np.testing.assert_allclose(reference.forward(model, weights, x), expected, rtol=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_flax_layout_computes_the_reference_forward_pass_and_round_trips(name):
    """Flax holds the same channels-last arrays as Keras, in its own trees (params, batch_stats)."""
    from jax_service.layout import canonical_to_flax, flax_to_canonical

    x = digit_images(3)
    model = models.resolve(SPECS[name], x.shape[1:], 10)
    weights = random_weights(model)
    params, stats = canonical_to_flax(weights, model)
    as_keras_lists = {}
    for r in model.layers:
        if isinstance(r.layer, (Dense, Conv2D)):
            as_keras_lists[r.name] = [params[r.name]["kernel"], params[r.name]["bias"]]
        elif isinstance(r.layer, BatchNorm):
            as_keras_lists[r.name] = [params[r.name]["scale"], params[r.name]["bias"], stats[r.name]["mean"], stats[r.name]["var"]]
    np.testing.assert_allclose(keras_forward(model, as_keras_lists, x), reference.forward(model, weights, x), rtol=1e-9, atol=1e-9)
    back = flax_to_canonical(params, stats, model)
    assert back.keys() == weights.keys() and all(back[k].tobytes() == weights[k].tobytes() for k in weights)


def test_tiled_transposes_equal_numpys_bit_for_bit_at_any_shape_and_strides():
    """Matrices past TILED_TRANSPOSE_BYTES go tile by tile on threads; edges that fill no whole tile or block,
    a strided source and another dtype come out exactly as numpy's own transposing copy."""
    for shape, dtype in (((1100, 700), np.float32), ((70, 2300), np.float64), ((4, 70000), np.float32),
                         ((1032, 1540), np.float16), ((1028, 1030), np.float32)):
        source = RNG.standard_normal(shape).astype(dtype)
        source.reshape(-1)[:3] = [np.nan, np.inf, -0.0]
        assert source.nbytes >= transpose.TILED_TRANSPOSE_BYTES
        for view in (source, source[::2, 1:], source[:, 4:], source[:, 1:-3]):  # in chunks where rows allow (transpose._chunk), else tiles
            out = layouts.transposed(view)
            assert out.tobytes() == np.ascontiguousarray(view.T).tobytes() and out.flags.c_contiguous
            assert out.ctypes.data % ALIGNMENT == 0
            alone = np.empty(view.shape[::-1], dtype)
            transpose.transpose_into(view, alone, threads=1)  # as a move's bands go
            assert alone.tobytes() == out.tobytes()
            wider = np.zeros((view.shape[1], view.shape[0] + 8), dtype)  # into columns of a larger matrix, as a received band
            transpose.transpose_into(view, wider[:, 4:-4], threads=1)
            assert wider[:, 4:-4].tobytes() == out.tobytes() and not wider[:, :4].any() and not wider[:, -4:].any()
    cast = np.empty((1024, 512), np.float64)  # another dtype for the result: numpy's cast, not bytes moved
    source = RNG.standard_normal((512, 1024)).astype(np.float32)
    transpose.transpose_into(source, cast, threads=1)
    assert np.array_equal(cast, source.T.astype(np.float64))
    with pytest.raises(ValueError, match=r"\[3, 2\] does not transpose to \[3, 2\]"):
        transpose.transpose_into(np.zeros((3, 2)), np.zeros((3, 2)))


def test_reading_into_given_arrays_equals_the_fresh_conversion():
    """Layout.read_into (the send buffer filled straight from the framework's arrays) gives what to_canonical
    gives, for every kind with tensors, in Keras' and Flax's containers, and large kernels among them."""
    for name, shape in (("lenet", (1, 28, 28)), ("cnn-bn", (3, 16, 16)), ("mlp:2048,640", (1, 28, 28))):
        model = models.resolve(models.builtin(name), shape, 10)
        weights = random_weights(model)
        into = {key: np.full_like(array, np.nan) for key, array in weights.items()}
        keras_into_canonical(canonical_to_keras(weights, model), model, into)
        assert all(into[key].tobytes() == weights[key].tobytes() for key in weights), name
        into = {key: np.full_like(array, np.nan) for key, array in weights.items()}
        flax_into_canonical(*canonical_to_flax(weights, model), model, into)
        assert all(into[key].tobytes() == weights[key].tobytes() for key in weights), name
        converted = [a for arrays in canonical_to_keras(weights, model).values() for a in arrays]
        assert all(a.ctypes.data % ALIGNMENT == 0 and a.flags.c_contiguous for a in converted), name


@pytest.mark.parametrize("chw", [(1, 28, 28), (16, 1, 1)])
def test_a_flatten_of_one_channel_or_one_position_keeps_the_plain_transpose(chw):
    """reordered_rows leaves such a dense layer's kernel as its weight's plain transpose (received straight into
    the framework's layout, lent as a view): the reordering it skips changes nothing."""
    from weightrelay.layouts import _rows_hwc_from_chw, reordered_rows

    weight = np.random.default_rng(3).standard_normal((5, int(np.prod(chw)))).astype(np.float32)
    assert np.array_equal(_rows_hwc_from_chw(weight.T, *chw), weight.T)
    mlp = models.resolve(models.builtin("mlp"), (1, 28, 28), 10)
    assert reordered_rows(mlp.layers[1]) is None and mlp.layers[1].flattened_from == (1, 28, 28)
    lenet = models.resolve(models.builtin("lenet"), (3, 32, 32), 10)
    first_dense = next(r for r in lenet.layers if r.kind == "dense")
    assert reordered_rows(first_dense) == first_dense.flattened_from and first_dense.flattened_from[0] > 1
