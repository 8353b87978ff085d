"""Canonical [out, in] <-> Keras [in, out], checked on real data (scikit-learn's digits)."""

import numpy as np
from sklearn.datasets import load_digits

from keras_service.layout import canonical_to_keras, keras_to_canonical


def test_round_trip_both_ways_is_exact():
    rng = np.random.default_rng(1)
    canonical = {"fc1.weight": rng.standard_normal((5, 64)).astype(np.float32), "fc1.bias": rng.standard_normal(5).astype(np.float32)}
    keras_layers = canonical_to_keras(canonical, ["fc1"])
    assert keras_layers["fc1"][0].shape == (64, 5)
    back = keras_to_canonical(keras_layers)
    assert back.keys() == canonical.keys()
    assert all(np.array_equal(back[k], canonical[k]) and back[k].flags.c_contiguous for k in canonical)
    again = canonical_to_keras(back, ["fc1"])
    assert np.array_equal(again["fc1"][0], keras_layers["fc1"][0])


def test_both_layouts_compute_the_same_layer():
    x = load_digits().data.astype(np.float32)[:200]
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((10, 64)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    kernel, keras_bias = canonical_to_keras({"fc1.weight": weight, "fc1.bias": bias}, ["fc1"])["fc1"]
    torch_style = x @ weight.T + bias  # nn.Linear
    keras_style = x @ kernel + keras_bias  # keras Dense
    assert np.array_equal(torch_style.argmax(1), keras_style.argmax(1))
    np.testing.assert_allclose(torch_style, keras_style, rtol=1e-5, atol=1e-4)
