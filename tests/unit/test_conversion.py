"""weightrelay.conversion: matrices transposed band by band as their bytes arrive, handed over only whole and
only for the very arrays that arrived."""

from __future__ import annotations

import numpy as np
import pytest

from weightrelay import codec, conversion
from weightrelay.buffers import aligned_empty
from weightrelay.v1 import worker_pb2 as pb

RNG = np.random.default_rng(5)


def arrive(matrix: np.ndarray, into: np.ndarray, piece_bytes: int, follow: conversion.BandConversion, name: str) -> None:
    """Copy `matrix`'s bytes into `into` a piece at a time, telling `follow` after each, as codec.stream does."""
    source, target = matrix.reshape(-1).view(np.uint8), into.reshape(-1).view(np.uint8)
    for start in range(0, len(source), piece_bytes):
        stop = min(len(source), start + piece_bytes)
        target[start:stop] = source[start:stop]
        follow.written(name, into, stop)


@pytest.mark.parametrize("piece_bytes", [4096, 70_001, 10**9])
def test_a_matrix_arriving_in_pieces_is_transposed_whole_and_exactly(piece_bytes, monkeypatch):
    monkeypatch.setattr(conversion, "BAND_ROWS", 100)  # several bands, and a last one that is short
    matrix = RNG.standard_normal((1050, 300)).astype(np.float32)
    received = np.empty_like(matrix)
    follow = conversion.BandConversion({"fc.weight"}, aligned_empty)
    arrive(matrix, received, piece_bytes, follow, "fc.weight")
    follow.written("fc.bias", np.zeros(3, np.float32), 12)  # not a target: ignored
    done = follow.converted({"fc.weight": received[:]})  # a view of the same memory counts as the same array
    assert set(done) == {"fc.weight"} and done["fc.weight"].tobytes() == np.ascontiguousarray(matrix.T).tobytes()
    follow.cancel()  # after use: harmless


def test_nothing_is_handed_over_for_other_memory_an_unfinished_matrix_or_a_cancelled_receive():
    matrix = RNG.standard_normal((64, 40)).astype(np.float32)
    received = np.empty_like(matrix)
    follow = conversion.BandConversion({"w"}, aligned_empty)
    arrive(matrix, received, 64 * 40 * 4, follow, "w")
    assert follow.converted({"w": received.copy()}) == {}  # equal values, other memory: not what was converted
    partial = conversion.BandConversion({"w"}, aligned_empty)
    received_again = np.empty_like(matrix)
    partial.written("w", received_again, 40 * 4 * 10)  # ten rows of 64
    assert partial.converted({"w": received_again}) == {}
    cancelled = conversion.BandConversion({"w"}, aligned_empty)
    arrive(matrix, received, 1000, cancelled, "w")
    cancelled.cancel()
    assert cancelled.converted({"w": received}) == {}


def test_the_codec_tells_the_conversion_about_every_piece_and_the_set_still_checks():
    weights = {"a.weight": RNG.standard_normal((500, 200)).astype(np.float32), "a.bias": RNG.standard_normal(500).astype(np.float32)}
    follow = conversion.BandConversion({"a.weight"}, aligned_empty)
    chunks = [pb.WeightsChunk.FromString(m) for m in codec.encode_weight_chunks(weights, 9000)]
    received, sha = codec.receive_weights(chunks, {n: codec.TensorSpec.of(n, w) for n, w in weights.items()}, on_piece=follow.written)
    assert sha == codec.weights_sha256(weights)
    done = follow.converted(received)
    assert done["a.weight"].tobytes() == np.ascontiguousarray(weights["a.weight"].T).tobytes()
