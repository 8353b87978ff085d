"""weightrelay.conversion: matrices received band by band straight into their transposed layout, checked like any
tensor, handed over only whole and only for the very set that arrived."""

from __future__ import annotations

import numpy as np
import pytest

from weightrelay import codec, conversion
from weightrelay.v1 import worker_pb2 as pb

RNG = np.random.default_rng(5)


def manifest_of(weights: dict[str, np.ndarray]) -> dict[str, codec.TensorSpec]:
    return {name: codec.TensorSpec.of(name, array) for name, array in weights.items()}


def received_into(weights: dict[str, np.ndarray], piece_bytes: int, follow: conversion.BandConversion, pack: bool = False):
    chunks = [pb.WeightsChunk.FromString(m) for m in codec.encode_weight_chunks(weights, piece_bytes, pack=pack)]
    return codec.receive_weights(chunks, manifest_of(weights), sink=follow.sink)


@pytest.mark.parametrize("piece_bytes", [64 * 1024, 70_001, 4 * 1024 * 1024])
def test_a_matrix_is_received_band_by_band_into_its_transpose_exactly(piece_bytes, monkeypatch):
    monkeypatch.setattr(conversion, "BAND_BYTES", 100 * 300 * 4)  # several bands of 100 rows, and a last one that is short
    monkeypatch.setattr(conversion, "BANDS", 2)  # the receive waits for the thread to give a buffer back
    weights = {"fc.weight": RNG.standard_normal((1050, 300)).astype(np.float32), "fc.bias": RNG.standard_normal(1050).astype(np.float32)}
    follow = conversion.BandConversion({"fc.weight", "other.weight"})
    received, sha = received_into(weights, piece_bytes, follow)
    assert sha == codec.weights_sha256(weights)  # hashed from the pieces as they came
    assert received["fc.weight"].shape == (1050, 300) and np.array_equal(received["fc.weight"], weights["fc.weight"])
    assert np.array_equal(received["fc.bias"], weights["fc.bias"])  # not a target: the codec's own array
    done = follow.converted(received)
    assert set(done) == {"fc.weight"} and done["fc.weight"].flags.c_contiguous
    assert done["fc.weight"].tobytes() == np.ascontiguousarray(weights["fc.weight"].T).tobytes()
    assert np.shares_memory(done["fc.weight"], received["fc.weight"])  # what was checked is what is handed over
    follow.cancel()  # after use: harmless


def test_a_row_longer_than_a_band_is_one_band(monkeypatch):
    monkeypatch.setattr(conversion, "BAND_BYTES", 64)
    weights = {"w": RNG.standard_normal((7, 100)).astype(np.float32)}
    follow = conversion.BandConversion({"w"})
    received, _ = received_into(weights, 64 * 1024, follow)
    assert follow.converted(received)["w"].tobytes() == np.ascontiguousarray(weights["w"].T).tobytes()


def test_a_converted_matrix_is_scanned_for_nan_and_inf_band_by_band():
    """A float matrix found finite band by band is not scanned again by the receive (its bands were checked
    beside the transfer); one with NaN or Inf is, and refused naming the first index."""
    matrix = RNG.standard_normal((40, 30)).astype(np.float32)
    follow = conversion.BandConversion({"w"})
    received_into({"w": matrix}, 64 * 1024, follow)
    assert follow._sinks["w"].checked_finite
    for value, where in ((np.nan, (3, 17)), (-np.inf, (39, 29))):
        bad = matrix.copy()
        bad[where] = value
        follow = conversion.BandConversion({"w"})
        with pytest.raises(codec.TensorError, match=rf"tensor w: 1 non-finite value\(s\).*index \[{where[0]}, {where[1]}\]"):
            received_into({"w": bad}, 64 * 1024, follow)
        assert not follow._sinks["w"].checked_finite
        follow.cancel()
    integers = conversion.BandConversion({"w"})
    received_into({"w": RNG.integers(0, 9, (40, 30)).astype(np.int32)}, 64 * 1024, integers)
    assert not integers._sinks["w"].checked_finite  # not scanned: no float


def test_a_damaged_converted_matrix_fails_the_checksum():
    weights = {"w": RNG.standard_normal((64, 40)).astype(np.float32)}
    chunks = [pb.WeightsChunk.FromString(m) for m in codec.encode_weight_chunks(weights, 1024)]
    data = bytearray(chunks[3].piece.tensor.data)
    data[5] ^= 1
    chunks[3].piece.tensor.data = bytes(data)
    follow = conversion.BandConversion({"w"})
    with pytest.raises(codec.TensorError, match="checksum mismatch"):
        codec.receive_weights(chunks, manifest_of(weights), sink=follow.sink)
    follow.cancel()


def test_nothing_is_handed_over_for_another_set_an_unfinished_matrix_or_a_cancelled_receive():
    weights = {"w": RNG.standard_normal((64, 40)).astype(np.float32)}
    follow = conversion.BandConversion({"w"})
    received, _ = received_into(weights, 1024, follow)
    assert follow.converted({"w": received["w"].copy()}) == {}  # equal values, other memory: not what was converted
    partial = conversion.BandConversion({"w"})
    sink = partial.sink(codec.TensorSpec.of("w", weights["w"]))
    sink.write(memoryview(weights["w"][:10].tobytes()))  # ten rows of 64
    assert partial.converted({"w": sink.array}) == {}
    cancelled = conversion.BandConversion({"w"})
    received, _ = received_into(weights, 1000, cancelled)
    cancelled.cancel()
    assert cancelled.converted(received) == {}


def test_only_non_empty_matrices_named_as_targets_get_a_sink():
    follow = conversion.BandConversion({"a", "b", "c"})
    assert follow.sink(codec.TensorSpec("a", "float32", (3, 4))) is not None
    assert follow.sink(codec.TensorSpec("b", "float32", (12,))) is None
    assert follow.sink(codec.TensorSpec("c", "float32", (0, 4))) is None
    assert follow.sink(codec.TensorSpec("d", "float32", (3, 4))) is None
    follow.cancel()
