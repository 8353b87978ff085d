"""Residual networks and transformers across the three frameworks: one framework trains (batchnorm statistics,
attention, position embedding all move), its weights go to the other two, and every framework's probabilities
equal the numpy reference's on the canonical tensors, on 1-channel (MNIST's format) and 3-channel (CIFAR-10's)
data. Real workers, real gRPC, generated files in the real formats (small, so the reference stays quick)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support import write_cifar10, write_idx_dataset
from tests.unit.test_graphs import small_residual, small_vit
from weightrelay import codec, models, reference
from weightrelay.data import load_dataset
from weightrelay.metrics import log_softmax
from weightrelay.v1 import worker_pb2 as pb

pytestmark = pytest.mark.integration

SPECS = {
    "small-residual": small_residual(),
    # a layernorm eps far from every framework's default (1e-5, 1e-3, 1e-6): a builder that dropped it would show
    "small-vit eps 0.05": small_vit(eps=0.05),
    "resnet20": models.builtin("resnet20"),
    "vit-tiny": models.builtin("vit-tiny"),
}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {1: write_idx_dataset(root / "mnist-format", train=200, test=60, seed=3),
            3: write_cifar10(root / "cifar10", per_batch=40, test=60, seed=12)}


@pytest.fixture(scope="module")
def workers(torch_worker, keras_worker, jax_worker):
    """The three shared workers; the seed's MLP on MNIST put back once the module is done."""
    both = {"torch": torch_worker, "keras": keras_worker, "jax": jax_worker}
    yield both
    for w in both.values():
        w.client.initialize("mlp", 0, "mnist", "")


@pytest.mark.parametrize("name,channels,trainer", [  # each framework trains a residual network and a transformer
    ("small-residual", 1, "keras"), ("small-vit eps 0.05", 3, "jax"), ("resnet20", 3, "torch"),
    ("vit-tiny", 1, "torch"), ("small-vit eps 0.05", 1, "keras"), ("small-residual", 3, "jax"),
])
def test_moved_weights_give_the_reference_probabilities_in_every_framework(name, channels, trainer, workers, data_dirs):
    spec = models.to_proto(SPECS[name])
    for w in workers.values():
        w.client.initialize(spec, seed=3, dataset=str(data_dirs[channels]))
    workers[trainer].client.train_to_end(pb.TrainRequest(epochs=1, batch_size=32, learning_rate=0.05, momentum=0.5, seed=2, max_samples=96))
    weights = workers[trainer].client.get_weights()
    for receiver, w in workers.items():
        if receiver != trainer:
            w.client.set_weights(weights)
    replies = {framework: w.client.evaluate(include_predictions=True, include_probabilities=True) for framework, w in workers.items()}

    data = load_dataset(str(data_dirs[channels]), download=False)
    model = models.resolve(SPECS[name], data.input_shape, data.num_classes)
    assert data.input_shape[0] == channels
    if any(r.kind == "batchnorm" for r in model.layers):
        assert not np.allclose(weights[next(n for n in weights if n.endswith("running_var"))], 1.0)  # trained statistics moved
    logits = reference.forward(model, weights, data.test.x)
    expected = np.exp(log_softmax(logits))
    assert logits.std(axis=0).max() > 1e-3  # the outputs depend on the input
    for framework, reply in replies.items():
        assert reply.weights_sha256 == codec.weights_sha256(weights), framework
        np.testing.assert_allclose(codec.from_proto(reply.probabilities), expected, atol=1e-5, rtol=0, err_msg=framework)
    assert len({tuple(reply.predictions) for reply in replies.values()}) == 1
