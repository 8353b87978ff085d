"""weightrelay.store: a worker that sends its kernels as it holds them computes the stream's own checksum once per
set and keeps it (so does a worker for a set it received so, whose checksum it verified); a changed set is hashed
again, and a reader that asks for nothing transposed gets the canonical stream. The adapter here is a plain numpy
one that holds its large kernel [in, out], as Keras and JAX do: this tests the store, not a framework."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from weightrelay import codec, store
from weightrelay.adapter import FrameworkAdapter, ModelThread
from weightrelay.codec import wire
from weightrelay.conversion import BandConversion
from weightrelay.gate import ModelGate
from weightrelay.v1 import worker_pb2 as pb


class HeldKernels(FrameworkAdapter):
    """fc.weight held [in, out] (sent as held, received straight into that layout), fc.bias as it is."""

    framework = "numpy"

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.kernel = rng.standard_normal((300, 1050)).astype(np.float32)  # [in, out]
        self.bias = rng.standard_normal(1050).astype(np.float32)

    def build(self, model, seed: int) -> None:
        raise NotImplementedError

    def versions(self) -> tuple[str, str]:
        return np.__version__, ""

    def device(self) -> str:
        return "cpu"

    def get_weights(self):
        return {"fc.weight": np.ascontiguousarray(self.kernel.T), "fc.bias": self.bias.copy()}

    def weight_views(self):
        return {"fc.weight": self.kernel.T, "fc.bias": self.bias}

    def conversion(self, manifest) -> BandConversion:
        return BandConversion({"fc.weight"} & set(manifest))

    def set_weights(self, weights: Mapping[str, np.ndarray], converted: Mapping[str, np.ndarray] | None = None) -> None:
        self.kernel = converted["fc.weight"] if converted and "fc.weight" in converted else np.ascontiguousarray(weights["fc.weight"].T)
        self.bias = weights["fc.bias"].copy()

    def train(self, x, y, config, tracker) -> None:
        raise NotImplementedError

    def predict_logits(self, x, batch_size: int):
        raise NotImplementedError


class Caller:
    """A gRPC call's context as the store reads it: still waiting for its answer, carrying no lease."""

    def is_active(self) -> bool:
        return True

    def invocation_metadata(self):
        return ()


def worker(seed: int) -> store.WeightStore:
    adapter = HeldKernels(seed)
    weights = store.WeightStore(ModelThread(adapter), ModelGate())
    weights.reset({name: codec.TensorSpec.of(name, array) for name, array in adapter.get_weights().items()})
    return weights


def send(weights: store.WeightStore, transposed=()) -> list[bytes]:
    return list(weights.stream(weights.open_send(Caller(), transposed), 64 * 1024, False))


def test_a_set_sent_as_held_is_hashed_once_and_a_set_received_so_not_at_all(monkeypatch):
    monkeypatch.setattr(store, "DIRECT_READ_BYTES", 0)  # every set read straight from the model, as large sets are
    hashed: list[int] = []

    class Counted(codec.checksum.BackgroundHash):
        def __init__(self) -> None:
            hashed.append(1)
            super().__init__()

    monkeypatch.setattr(wire, "BackgroundHash", Counted)
    sender, receiver = worker(1), worker(2)
    asked = sorted(receiver.receives_transposed)
    assert asked == ["fc.weight"]

    first, again = send(sender, asked), send(sender, asked)
    assert len(hashed) == 1 and first == again  # the second send took the kept checksum
    digest = pb.WeightsChunk.FromString(first[-1]).digest
    canonical = sender.adapter.get_weights()
    assert digest.sha256 == sender.sha256 == codec.weights_sha256(canonical)
    assert digest.stream_sha256 == codec.stream_sha256(canonical, {"fc.weight"})

    received = receiver.receive(codec.decode_chunk(m) for m in again)
    assert received.transposed == {"fc.weight"} and received.stream_sha256 == digest.stream_sha256
    assert receiver.apply(received, Caller(), "SetWeights").sha256 == sender.sha256 == receiver.sha256
    assert all(np.array_equal(receiver.adapter.get_weights()[n], canonical[n]) for n in canonical)
    assert send(receiver, asked) == first and len(hashed) == 1  # the checksum it verified, kept: no hashing

    plain = [pb.WeightsChunk.FromString(m) for m in send(receiver)]  # a reader that asks for nothing transposed
    assert not any(c.piece.tensor.transposed for c in plain[:-1]) and plain[-1].digest.stream_sha256 == ""
    assert codec.receive_weights(plain)[1] == sender.sha256

    receiver.adapter.kernel[0, 0] += 1  # the set changes (as a Train changes it): its stream is hashed anew
    receiver.sha256 = receiver.model_sha()
    changed = pb.WeightsChunk.FromString(send(receiver, asked)[-1]).digest
    assert len(hashed) == 2 and changed.stream_sha256 == codec.stream_sha256(receiver.adapter.get_weights(), {"fc.weight"})


def test_only_the_last_stream_checksums_are_kept():
    weights = worker(3)
    names = frozenset({"fc.weight"})
    for index in range(store.STREAM_SUMS_KEPT + 2):
        weights._remember_stream_sum(f"{index:064x}", names, f"stream {index}")
    assert weights._stream_sum(f"{0:064x}", names) is None and weights._stream_sum(f"{1:064x}", names) is None
    assert weights._stream_sum(f"{store.STREAM_SUMS_KEPT + 1:064x}", names) == f"stream {store.STREAM_SUMS_KEPT + 1}"
    assert weights._stream_sum(f"{store.STREAM_SUMS_KEPT + 1:064x}", frozenset()) is None
