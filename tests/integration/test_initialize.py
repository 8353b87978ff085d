"""Initialize: every run a clean start, on any model spec, and the layouts proven across frameworks
on real framework forward passes (against the numpy reference, with 3-channel inputs so that
the flatten permutation matters)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from tests.support import write_cifar10
from weightrelay import codec, errors, models, reference
from weightrelay.data import load_dataset
from weightrelay.metrics import log_softmax
from weightrelay.v1 import worker_pb2 as pb

pytestmark = pytest.mark.integration


@pytest.fixture
def restore_seed_model(torch_worker, keras_worker, jax_worker):
    """Tests here rebuild the shared workers; put back the seed's MLP on MNIST afterwards."""
    yield
    for w in (torch_worker, keras_worker, jax_worker):
        w.client.initialize("mlp", 0, "mnist", "")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data") / "cifar10", per_batch=60, test=80, seed=11)


def test_same_spec_and_seed_give_the_same_weights_whatever_came_before(worker, restore_seed_model):
    first = worker.client.initialize("lenet", seed=5)
    assert first.weights_sha256 == worker.client.describe().weights_sha256
    worker.client.train_to_end(pb.TrainRequest(epochs=1, max_samples=640, seed=1, objective="swap:2,3"))
    assert worker.client.describe().objective == "swap:2,3"
    again = worker.client.initialize("lenet", seed=5)
    assert again.weights_sha256 == first.weights_sha256  # training and the objective are forgotten
    assert worker.client.describe().objective == "identity"
    assert worker.client.initialize("lenet", seed=6).weights_sha256 != first.weights_sha256
    assert worker.client.initialize("lenet", seed=0).weights_sha256 != first.weights_sha256  # 0 is a seed like any other


def test_initialize_reports_the_manifest_and_the_spec(worker, restore_seed_model):
    reply = worker.client.initialize("cnn-bn", seed=1, objective="swap:1,7")
    manifest = models.resolve(models.builtin("cnn-bn"), (1, 28, 28), 10).manifest
    assert [codec.spec_from_proto(p) for p in reply.parameters] == list(manifest.values())
    assert [p.name for p in reply.parameters if p.buffer] == [n for n, s in manifest.items() if s.buffer]
    assert reply.parameter_count == sum(int(np.prod(s.shape)) for s in manifest.values())
    assert reply.objective == "swap:1,7" and worker.client.describe().objective == "swap:1,7"
    assert models.from_proto(reply.model) == models.builtin("cnn-bn").named()
    assert reply.architecture.startswith("cnn-bn: 1x28x28 -> conv1 conv2d 16@3x3/1 same")
    weights = worker.client.get_weights()
    assert sorted(weights) == sorted(manifest) and codec.weights_sha256(weights) == reply.weights_sha256


def test_a_spec_sent_in_full_builds_the_same_model_as_its_name(worker, restore_seed_model):
    by_name = worker.client.initialize("lenet", seed=9)
    full = models.to_proto(models.builtin("lenet"))
    assert len(full.layers) == 8
    assert worker.client.initialize(full, seed=9).weights_sha256 == by_name.weights_sha256


@pytest.mark.parametrize("request_kwargs,code,text", [
    (dict(model=pb.ModelSpec(name="resnet")), grpc.StatusCode.INVALID_ARGUMENT, "unknown model 'resnet'"),
    (dict(model=pb.ModelSpec(name="x", layers=[pb.LayerSpec(dense=pb.DenseLayer(units=10))])), grpc.StatusCode.INVALID_ARGUMENT,
     "a dense layer needs flat input"),
    (dict(model=pb.ModelSpec(name="x", layers=[pb.LayerSpec(flatten=pb.FlattenLayer()), pb.LayerSpec(dense=pb.DenseLayer(units=7))])),
     grpc.StatusCode.INVALID_ARGUMENT, "ends in shape [7], but the data set has 10 classes"),
    (dict(model=pb.ModelSpec(name="x", layers=[pb.LayerSpec(name="l")])), grpc.StatusCode.INVALID_ARGUMENT, "no kind set"),
    (dict(dataset="imagenet"), grpc.StatusCode.INVALID_ARGUMENT, "unknown data set 'imagenet'"),
    (dict(objective="swap:1,12"), grpc.StatusCode.INVALID_ARGUMENT, "out of range 0-9"),
])
def test_bad_initialize_is_refused_and_changes_nothing(worker, request_kwargs, code, text):
    before = worker.client.describe()
    with pytest.raises(grpc.RpcError) as info:
        worker.client.stub.Initialize(pb.InitializeRequest(**request_kwargs), timeout=60)
    assert info.value.code() == code and text in info.value.details()
    after = worker.client.describe()
    assert after.weights_sha256 == before.weights_sha256 and after.model == before.model and after.dataset == before.dataset


def test_a_directory_without_data_is_refused_and_missing_files_are_a_failed_precondition(worker, tmp_path):
    before = worker.client.describe()
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(grpc.RpcError) as info:
        worker.client.initialize("mlp", dataset=str(tmp_path / "nothing-here"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds neither IDX files nor CIFAR-10 binary batches" in info.value.details()
    (tmp_path / "kmnist").mkdir()  # a known data set whose files are not there (and cannot be fetched here)
    with pytest.raises(grpc.RpcError) as info:
        worker.client.initialize("mlp", dataset=str(tmp_path / "kmnist"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"KMNIST data directory {tmp_path / 'kmnist'} lacks train-images-idx3-ubyte.gz" in info.value.details()
    after = worker.client.describe()
    assert after.weights_sha256 == before.weights_sha256 and after.dataset == before.dataset


def test_initialize_during_training_is_refused(worker):
    stream = worker.client.train(pb.TrainRequest(epochs=50, batch_size=32, progress_every_batches=10))
    assert next(stream).WhichOneof("event") == "progress"
    with pytest.raises(grpc.RpcError) as info:
        worker.client.initialize("mlp")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "training" in info.value.details()
    assert errors.reason_of(info.value) == errors.WORKER_TRAINING
    stream.cancel()
    deadline = 60
    start = time.monotonic()
    while True:
        try:
            worker.client.initialize("mlp", 0, "mnist")
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() - start < deadline
            time.sleep(0.2)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


SPECS = {
    "lenet": models.builtin("lenet"),
    "cnn-bn": models.builtin("cnn-bn"),
    "strided": models.ModelSpec("strided", (
        models.Conv2D(8, 4, stride=2, padding="same", activation="tanh"), models.BatchNorm(eps=1e-3, momentum=0.3),
        models.MaxPool2D(3, 2), models.Flatten(), models.Dropout(0.1), models.Dense(16, "sigmoid"), models.Dense(0),
    )),
}


@pytest.mark.parametrize("trainer,receiver", [("torch", "keras"), ("keras", "torch"), ("torch", "jax"), ("jax", "keras")])
@pytest.mark.parametrize("name", SPECS)
def test_moved_weights_compute_the_reference_forward_pass_in_both_frameworks(name, trainer, receiver, torch_worker, keras_worker,
                                                                            jax_worker, cifar_dir, restore_seed_model):
    """On 3-channel data: one framework trains (BatchNorm statistics move too), the weights move to another,
    and both frameworks' probabilities equal the numpy reference's on the canonical tensors."""
    workers = {"torch": torch_worker, "keras": keras_worker, "jax": jax_worker}
    spec = models.to_proto(SPECS[name])
    sender, receiver = workers[trainer], workers[receiver]
    for w in (sender, receiver):
        w.client.initialize(spec, seed=4, dataset=str(cifar_dir))
    sender.client.train_to_end(pb.TrainRequest(epochs=1, batch_size=32, learning_rate=0.05, momentum=0.5, seed=2))
    weights = sender.client.get_weights()
    if SPECS[name].layers[1].__class__ is models.BatchNorm:
        assert not np.allclose(weights["bn1.running_var"], 1.0)  # the statistics were trained, so moving them is tested
    receiver.client.set_weights(weights)
    sent = sender.client.evaluate(include_predictions=True, include_probabilities=True)
    received = receiver.client.evaluate(include_predictions=True, include_probabilities=True)
    assert sent.weights_sha256 == received.weights_sha256 == codec.weights_sha256(weights)

    data = load_dataset(str(cifar_dir), download=False)
    model = models.resolve(SPECS[name], data.input_shape, data.num_classes)
    expected = _softmax(reference.forward(model, weights, data.test.x))
    for reply in (sent, received):
        probabilities = codec.from_proto(reply.probabilities)
        assert probabilities.shape == (80, 10)
        np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0)
    assert list(sent.predictions) == list(received.predictions)
