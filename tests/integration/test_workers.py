"""Each worker as a real process on a free port, spoken to over real gRPC, on real MNIST."""

from __future__ import annotations


import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.support import seed_manifest as canonical_manifest
from tests.support import wait_until_free
from weightrelay import codec, errors, models
from weightrelay.data import load_mnist
from weightrelay.v1 import worker_pb2 as pb

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mnist(data_dir):
    return load_mnist(data_dir, download=False)


def describe_sha(worker) -> str:
    return worker.client.describe().weights_sha256


def test_describe_reports_the_model_the_data_and_the_device(worker, mnist):
    reply = worker.client.describe()
    assert reply.framework == worker.name
    assert reply.framework_version and reply.backend and reply.python_version
    assert reply.device.startswith("cpu") or reply.device.startswith(("cuda", "gpu"))
    assert reply.architecture == models.resolve(models.builtin("mlp"), (1, 28, 28), 10).describe()
    assert models.from_proto(reply.model) == models.builtin("mlp").named()
    assert [codec.spec_from_proto(p) for p in reply.parameters] == list(canonical_manifest().values())
    assert reply.dataset.fingerprint == mnist.fingerprint
    assert reply.dataset.name == "mnist" and list(reply.dataset.class_names) == list("0123456789")
    assert list(reply.dataset.input_shape) == [1, 28, 28] and list(reply.dataset.mean) == pytest.approx([0.1307])
    assert (reply.dataset.train_samples, reply.dataset.test_samples) == (len(mnist.train.y), len(mnist.test.y))
    assert reply.weights_sha256 == codec.weights_sha256(worker.client.get_weights())


def test_health_service_reports_serving(worker):
    with grpc.insecure_channel(worker.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "weightrelay.v1.Worker"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service_and_a_generic_client_calls_describe(worker):
    """What grpcurl does: learn the schema from the server, then call with dynamic messages."""
    with grpc.insecure_channel(worker.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "weightrelay.v1.Worker" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("weightrelay.v1.Worker").methods_by_name["Describe"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        reply_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/weightrelay.v1.Worker/Describe",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=reply_cls.FromString,
        )
        reply = call(request_cls(), timeout=30)
        assert reply.framework == worker.name
        assert len(reply.parameters) == 6


def test_reflection_v1_answers_as_well_as_v1alpha(worker):
    """grpcurl and newer clients ask grpc.reflection.v1 first; the messages are v1alpha's byte for byte."""
    with grpc.insecure_channel(worker.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="weightrelay.v1.Worker")]
        listed, described = list(call(iter(requests), timeout=30))
    names = {service.name for service in listed.list_services_response.service}
    assert {"weightrelay.v1.Worker", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_short_train_streams_progress_and_changes_the_weights(worker):
    before = describe_sha(worker)
    events = list(worker.client.train(pb.TrainRequest(
        epochs=2, batch_size=64, learning_rate=0.05, momentum=0.5, seed=3, objective="swap:1,7",
        max_samples=2048, progress_every_batches=8,
    )))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "summary" and kinds.count("summary") == 1
    progress = [e.progress for e in events[:-1]]
    assert [p.batch for p in progress if p.epoch == 1] == [8, 16, 24, 32]  # 2048 / 64 = 32 batches
    assert [p.epoch for p in progress if p.epoch_end] == [1, 2]
    assert all(p.loss > 0 and 0 <= p.accuracy <= 1 and p.samples_per_second > 0 for p in progress)
    summary = events[-1].summary
    assert summary.samples_seen == 2 * 2048 and summary.objective == "swap:1,7"
    assert summary.weights_sha256 != before  # training moved the weights
    assert worker.client.describe().objective == "swap:1,7"
    assert describe_sha(worker) == summary.weights_sha256


def test_train_rejects_bad_arguments(worker):
    with pytest.raises(grpc.RpcError) as info:
        list(worker.client.train(pb.TrainRequest(objective="swap:1,11", momentum=1.5)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of range" in info.value.details() and "momentum" in info.value.details()


def test_steps_of_a_schedule_whose_batches_are_larger_than_the_samples(worker):
    """With fewer samples than a batch, each epoch is one batch of every sample (adapter.schedule): two
    epochs are two steps, and the second can be run alone (twin mode does), the third is past the end."""
    events = list(worker.client.train(pb.TrainRequest(epochs=2, batch_size=64, max_samples=10, seed=1, start_step=1, max_steps=1)))
    assert events[-1].summary.samples_seen == 10
    with pytest.raises(grpc.RpcError) as info:
        list(worker.client.train(pb.TrainRequest(epochs=2, batch_size=64, max_samples=10, seed=1, start_step=2)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start_step 2 is past the schedule's 2 steps" in info.value.details()


def test_evaluate_scores_the_true_test_labels(worker, mnist):
    reply = worker.client.evaluate(include_predictions=True, include_probabilities=True)
    cm = np.array([row.counts for row in reply.confusion_matrix])
    assert cm.shape == (10, 10) and cm.sum() == len(mnist.test.y) == reply.samples
    assert cm.sum(axis=1).tolist() == np.bincount(mnist.test.y, minlength=10).tolist()  # rows are true labels
    predictions = np.array(reply.predictions)
    assert cm.sum(axis=0).tolist() == np.bincount(predictions, minlength=10).tolist()  # columns predicted
    assert reply.accuracy == pytest.approx(np.trace(cm) / cm.sum())
    probabilities = codec.from_proto(reply.probabilities)
    assert probabilities.shape == (len(mnist.test.y), 10)
    assert np.array_equal(probabilities.argmax(1), predictions)
    assert [m.label for m in reply.per_class] == list(range(10))
    assert [m.support for m in reply.per_class] == cm.sum(axis=1).tolist()
    assert reply.loss > 0


def test_get_set_weights_round_trip_is_bit_exact(worker):
    original = worker.client.get_weights(max_chunk_bytes=50_000)  # fc1.weight arrives in 9 pieces
    altered = {name: array * np.float32(0.5) for name, array in original.items()}
    reply = worker.client.set_weights(altered, max_chunk_bytes=7_000)
    assert reply.tensor_count == 6 and reply.sha256 == codec.weights_sha256(altered)
    back = worker.client.get_weights()
    assert all(back[name].tobytes() == altered[name].tobytes() for name in altered)
    worker.client.set_weights(original)
    restored = worker.client.get_weights()
    assert all(restored[name].tobytes() == original[name].tobytes() for name in original)


def test_packed_weight_streams_both_ways(worker):
    """Every worker takes packed streams and sends one when asked: the seed's MLP in one message."""
    assert worker.client.describe().accepts_packed_pieces
    packed = list(worker.client.get_weights_serialized(pack=True))
    assert len(packed) == 1 and codec.holds_digest(packed[0])
    assert len(list(worker.client.get_weights_serialized())) == 7  # unpacked unless asked: six pieces and the digest
    original = codec.assemble_weights(pb.WeightsChunk.FromString(m) for m in packed)
    altered = {name: array * np.float32(0.5) for name, array in original.items()}
    reply = worker.client.set_weights_serialized(codec.encode_weight_chunks(altered, pack=True))
    assert reply.sha256 == codec.weights_sha256(altered)
    back = worker.client.get_weights()
    assert all(back[name].tobytes() == altered[name].tobytes() for name in altered)
    worker.client.set_weights(original)


def test_every_train_starts_with_a_fresh_optimizer(worker):
    """Momentum from one Train never leaks into the next (Keras reuses its compiled model and zeroes its optimizer)."""
    start = worker.client.get_weights()
    request = pb.TrainRequest(max_samples=640, seed=5, learning_rate=0.05, momentum=0.9)
    first = worker.client.train_to_end(request).weights_sha256
    worker.client.set_weights(start)
    assert worker.client.train_to_end(request).weights_sha256 == first
    worker.client.set_weights(start)


def test_an_applied_set_owns_its_memory(worker):
    """A worker receives every set into one buffer it reuses (weightrelay.buffers): the model must have
    copied the last set out of it, so a later stream that fills the buffer and is refused changes nothing."""
    original = worker.client.get_weights()
    applied = {name: array * np.float32(0.25) for name, array in original.items()}
    worker.client.set_weights(applied)
    refused = list(codec.iter_weight_chunks({name: array + np.float32(3) for name, array in original.items()}))
    refused[-1].digest.sha256 = codec.weights_sha256(applied)  # every piece lands, then the checksum fails
    with pytest.raises(grpc.RpcError) as info:
        worker.client.set_weights_stream(iter(refused))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "checksum mismatch" in info.value.details()
    after = worker.client.get_weights()
    assert all(after[name].tobytes() == applied[name].tobytes() for name in applied)
    worker.client.set_weights(original)


def _bad_streams(weights: dict[str, np.ndarray]):
    """(case, chunks, text the error must hold), each wrong in one way."""
    w = dict(weights)
    renamed = {("fc2.kernel" if n == "fc2.weight" else n): a for n, a in w.items()}
    yield "name", list(codec.iter_weight_chunks(renamed)), "unexpected tensor fc2.kernel"
    yield "shape", list(codec.iter_weight_chunks(dict(w, **{"fc1.weight": w["fc1.weight"].T.copy()}))), "tensor fc1.weight: expected shape [128, 784], got [784, 128]"
    yield "dtype", list(codec.iter_weight_chunks(dict(w, **{"fc3.bias": w["fc3.bias"].astype(np.float16)}))), "tensor fc3.bias: expected dtype FLOAT32, got FLOAT16"
    short = list(codec.iter_weight_chunks(w))
    for chunk in short:
        if chunk.WhichOneof("part") == "piece" and chunk.piece.tensor.name == "fc2.bias":
            chunk.piece.tensor.data = chunk.piece.tensor.data[:-8]
    yield "byte-length", short, "tensor fc2.bias: received 248 bytes, expected 256"
    nan = dict(w, **{"fc2.weight": w["fc2.weight"].copy()})
    nan["fc2.weight"][3, 4] = np.nan
    yield "nan", list(codec.iter_weight_chunks(nan)), "tensor fc2.weight: 1 non-finite value(s)"
    bad_sum = list(codec.iter_weight_chunks({n: a + np.float32(1) for n, a in w.items()}))
    bad_sum[-1].digest.sha256 = codec.weights_sha256(w)
    yield "checksum", bad_sum, "checksum mismatch"
    yield "missing", list(codec.iter_weight_chunks({n: a for n, a in w.items() if n != "fc1.bias"})), "missing tensor(s) fc1.bias"
    packed_nan = list(codec.iter_weight_chunks(nan, pack=True))  # one message: the pieces land, the check refuses
    yield "packed-nan", packed_nan, "tensor fc2.weight: 1 non-finite value(s)"


@pytest.mark.parametrize("case", ["name", "shape", "dtype", "byte-length", "nan", "checksum", "missing", "packed-nan"])
def test_bad_set_weights_is_refused_and_changes_nothing(worker, case):
    before = worker.client.get_weights()
    # Every tensor of the bad set differs from the worker's, so any partial write would show.
    different = {name: array + np.float32(1) for name, array in before.items()}
    chunks, expected = next((c, e) for name, c, e in _bad_streams(different) if name == case)
    with pytest.raises(grpc.RpcError) as info:
        worker.client.set_weights_stream(iter(chunks))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()
    after = worker.client.get_weights()
    assert all(after[name].tobytes() == before[name].tobytes() for name in before)


def test_calls_during_training_get_failed_precondition_and_cancel_stops_training(worker):
    stream = worker.client.train(pb.TrainRequest(epochs=50, batch_size=32, progress_every_batches=10))
    first = next(stream)
    assert first.WhichOneof("event") == "progress"
    described = worker.client.describe()  # Describe answers during training
    assert described.framework == worker.name and described.weights_sha256 == ""
    pull = lambda: worker.client.stub.PullWeights(pb.PullWeightsRequest(address=worker.address), timeout=30)  # noqa: E731
    for call in (worker.client.evaluate, worker.client.get_weights, pull):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "training" in info.value.details()
        assert errors.reason_of(info.value) == errors.WORKER_TRAINING  # what a client tests, not the message
    with pytest.raises(grpc.RpcError) as info:
        list(worker.client.train(pb.TrainRequest(epochs=1)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert errors.reason_of(info.value) == errors.WORKER_TRAINING
    stream.cancel()
    # The worker stops training at its next progress report and serves again.
    wait_until_free(worker, 60, "the worker kept training after the client cancelled", poll=0.2)


def test_torch_weights_give_keras_the_same_predictions(torch_worker, keras_worker):
    torch_worker.client.train_to_end(pb.TrainRequest(epochs=1, max_samples=6000, seed=5, objective="identity"))
    weights = torch_worker.client.get_weights()
    keras_worker.client.set_weights(weights)
    sent = torch_worker.client.evaluate(include_predictions=True, include_probabilities=True)
    received = keras_worker.client.evaluate(include_predictions=True, include_probabilities=True)
    assert sent.weights_sha256 == received.weights_sha256 == codec.weights_sha256(weights)
    sent_p, received_p = codec.from_proto(sent.probabilities), codec.from_proto(received.probabilities)
    differ = np.flatnonzero(np.array(sent.predictions) != np.array(received.predictions))
    # Identical weights, identical predictions; the only licence is a numerical tie in the
    # sender's own output (top two probabilities within float32 noise).
    top2 = np.sort(sent_p[differ], axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] < 1e-5), f"{len(differ)} test samples predicted differently"
    assert np.abs(sent_p - received_p).max() < 1e-4
