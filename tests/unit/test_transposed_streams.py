"""Matrices sent as both sides hold them (worker.proto, Tensor.transposed): a reader that holds a kernel [in, out]
asks for it so, a sender that holds it so too sends its memory as it is, and neither transposes. The stream is
checked against its own checksum (WeightsDigest.stream_sha256), every other rule of a stream still holds, and
a reader that did not ask refuses such a stream."""

from __future__ import annotations

import numpy as np
import pytest

from weightrelay import codec, conversion
from weightrelay.codec import wire
from weightrelay.v1 import worker_pb2 as pb

RNG = np.random.default_rng(11)


def held_set() -> dict[str, np.ndarray]:
    """A set as a channels-last framework lends it: fc.weight is an [in, out] kernel seen as the canonical [out, in]."""
    kernel = RNG.standard_normal((300, 1050)).astype(np.float32)  # [in, out]
    return {"fc.weight": kernel.T, "fc.bias": RNG.standard_normal(1050).astype(np.float32),
            "head.weight": RNG.standard_normal((10, 1050)).astype(np.float32)}


def manifest_of(weights: dict[str, np.ndarray]) -> dict[str, codec.TensorSpec]:
    return {name: codec.TensorSpec.of(name, array) for name, array in weights.items()}


def encoded(weights, piece_bytes=64 * 1024, pack=False, transposed=("fc.weight",), **kw) -> list[bytes]:
    return list(codec.encode_weight_chunks(weights, piece_bytes, pack=pack, transposed=transposed, **kw))


def receive(messages, weights, targets=frozenset({"fc.weight"})):
    follow = conversion.BandConversion(set(targets))
    received = codec.receive_stream((codec.decode_chunk(m) for m in messages), manifest_of(weights), sink=follow.sink)
    return received, follow


@pytest.mark.parametrize("piece_bytes, pack", [(64 * 1024, False), (70_001, False), (0, True), (1000, True)])
def test_a_held_matrix_goes_as_it_is_held_and_arrives_exactly(piece_bytes, pack):
    weights = held_set()
    sums: list[str] = []
    messages = encoded(weights, piece_bytes, pack, hashed=sums.append)
    stream = [pb.WeightsChunk.FromString(m) for m in messages]
    pieces = [p for c in stream for p in ([*c.pieces, c.piece] if c.WhichOneof("part") == "piece" else c.pieces)]
    flagged = {p.tensor.name for p in pieces if p.tensor.transposed}
    assert flagged == {"fc.weight"}  # only the matrix asked for and held transposed
    sent = b"".join(p.tensor.data for p in pieces if p.tensor.name == "fc.weight")
    assert sent == weights["fc.weight"].T.tobytes()  # the kernel's own bytes, untransposed
    digest = stream[-1].digest
    assert digest.sha256 == codec.weights_sha256(weights)  # the set's checksum, as ever
    assert digest.stream_sha256 == codec.stream_sha256(weights, {"fc.weight"}) == sums[0] != digest.sha256
    assert [codec.decode_chunk(m) for m in messages] == [codec.stream_message(c) for c in stream]  # fast path = protobuf

    received, follow = receive(messages, weights)
    assert received.sha256 == digest.sha256 and received.transposed == {"fc.weight"} and received.stream_sha256 == digest.stream_sha256
    assert all(np.array_equal(received.weights[n], weights[n]) and received.weights[n].shape == weights[n].shape for n in weights)
    done = follow.converted(received.weights)
    assert set(done) == {"fc.weight"} and done["fc.weight"].flags.c_contiguous
    assert done["fc.weight"].tobytes() == weights["fc.weight"].T.tobytes()
    assert np.shares_memory(done["fc.weight"], received.weights["fc.weight"])  # what was checked is what is handed over


def test_a_known_stream_checksum_is_sent_without_hashing_and_checked_by_the_receiver(monkeypatch):
    weights = held_set()
    right = codec.stream_sha256(weights, {"fc.weight"})
    monkeypatch.setattr(wire, "BackgroundHash", lambda: pytest.fail("the sender hashed a stream whose checksum it was given"))
    received, _ = receive(encoded(weights, stream_sha256=right), weights)
    assert received.stream_sha256 == right
    with pytest.raises(codec.TensorError, match="checksum mismatch: the digest says stream_sha256"):
        receive(encoded(weights, stream_sha256="0" * 64), weights)


def test_matrices_not_asked_for_or_not_held_transposed_go_canonical():
    weights = held_set()
    for asked in ((), ("fc.bias", "head.weight", "missing")):  # head.weight is held [out, in]: nothing to save
        assert codec.sends_transposed(weights, asked) == frozenset()
        digest = pb.WeightsChunk.FromString(encoded(weights, transposed=asked)[-1]).digest
        assert digest.stream_sha256 == ""
        received, _ = receive(encoded(weights, transposed=asked), weights)
        assert received.transposed == frozenset() and received.sha256 == codec.weights_sha256(weights)


def test_a_reader_that_does_not_take_a_matrix_transposed_refuses_it():
    weights = held_set()
    with pytest.raises(codec.TensorError, match=r"tensor fc.weight: sent transposed, which this receiver does not take for it.*\[1050, 300\]"):
        receive(encoded(weights), weights, targets=frozenset())
    with pytest.raises(codec.TensorError, match="does not take"):
        codec.receive_weights(codec.decode_chunk(m) for m in encoded(weights))  # no sink at all


def with_changed(messages: list[bytes], change) -> list[bytes]:
    chunks = [pb.WeightsChunk.FromString(m) for m in messages]
    change(chunks)
    return [c.SerializeToString() for c in chunks]


def test_a_transposed_stream_keeps_every_rule():
    weights = held_set()
    messages = encoded(weights)

    def flag_bias(chunks):  # a vector cannot be transposed
        for c in chunks:
            if c.WhichOneof("part") == "piece" and c.piece.tensor.name == "fc.bias":
                c.piece.tensor.transposed = True

    def unflag_last_kernel_piece(chunks):
        [c for c in chunks if c.WhichOneof("part") == "piece" and c.piece.tensor.name == "fc.weight"][-1].piece.tensor.transposed = False

    def drop_stream_sum(chunks):
        chunks[-1].digest.stream_sha256 = ""

    def corrupt(chunks):
        piece = [c for c in chunks if c.WhichOneof("part") == "piece" and c.piece.tensor.name == "fc.weight"][1].piece.tensor
        piece.data = bytes([piece.data[0] ^ 1]) + piece.data[1:]

    def bad_set_sum(chunks):
        chunks[-1].digest.sha256 = "not a checksum"

    cases = [(flag_bias, r"tensor fc.bias: sent transposed, but shape \[1050\] is not a matrix"),
             (unflag_last_kernel_piece, "tensor fc.weight: pieces disagree on whether it is sent transposed"),
             (drop_stream_sum, "its digest needs both"),
             (bad_set_sum, "its digest needs both"),
             (corrupt, "checksum mismatch: the digest says stream_sha256")]
    for change, message in cases:
        with pytest.raises(codec.TensorError, match=message):
            receive(with_changed(messages, change), weights)


def test_a_transposed_matrix_is_scanned_for_nan():
    weights = held_set()
    kernel = weights["fc.weight"].T.copy()
    kernel[7, 3] = np.nan  # canonical index [3, 7]
    bad = dict(weights, **{"fc.weight": kernel.T})
    with pytest.raises(codec.TensorError, match=r"tensor fc.weight: 1 non-finite value\(s\).*index \[3, 7\]"):
        receive(encoded(bad), bad)


def test_a_held_matrix_is_copied_and_scanned_for_nan_piece_by_piece():
    """Its pieces, of any size, even cut inside a value, land in `out` in order; a float matrix found finite piece by
    piece is not scanned again by the receive, one holding NaN is (and named there, as above); a cancelled receive
    hands nothing over."""
    kernel = RNG.standard_normal((300, 1050)).astype(np.float32)  # [in, out]
    spec = codec.TensorSpec("w", "float32", (1050, 300))
    bad = kernel.copy()
    bad[250, 1000] = np.nan
    for values, finite in ((kernel, True), (bad, False)):
        data = values.tobytes()
        for cut in (7_001, 4096, 70_001):
            follow = conversion.BandConversion({"w"})
            sink = follow.sink(spec, transposed=True)
            for start in range(0, len(data), cut):
                sink.write(data[start : start + cut])
            sink.complete()
            assert sink.whole and sink.checked_finite is finite and sink.out.tobytes() == data
            assert follow.converted({"w": sink.array})["w"] is sink.out
    cancelled = conversion.BandConversion({"w"})
    sink = cancelled.sink(spec, transposed=True)
    sink.write(kernel.tobytes())
    cancelled.cancel()
    assert cancelled.converted({"w": sink.array}) == {}


def test_tensors_out_of_name_order_are_hashed_as_sent_once_whole():
    weights = held_set()
    chunks = [pb.WeightsChunk.FromString(m) for m in encoded(weights)]
    *pieces, digest = chunks
    reordered = sorted(pieces, key=lambda c: c.piece.tensor.name != "head.weight")  # head.weight first, the rest in order
    received, _ = receive([c.SerializeToString() for c in [*reordered, digest]], weights)
    assert received.stream_sha256 == codec.stream_sha256(weights, {"fc.weight"}) and received.sha256 == codec.weights_sha256(weights)


def test_a_matrix_swapped_for_a_canonical_copy_mid_stream_still_goes_transposed():
    """A worker's direct read swaps the model's memory for a copy when another call waits (store.DirectRead):
    the pieces still to come are cut from the copy, transposed."""
    weights = held_set()
    stream = codec.encode_weight_chunks(weights, 64 * 1024, transposed=("fc.weight",))
    messages = [next(stream) for _ in range(3)]  # fc.bias, then two pieces of fc.weight from its memory
    weights["fc.weight"] = np.ascontiguousarray(weights["fc.weight"])  # the detach's copy, canonical
    messages += list(stream)
    received, follow = receive(messages, weights)
    assert np.array_equal(received.weights["fc.weight"], weights["fc.weight"])
    assert received.stream_sha256 == codec.stream_sha256(weights, {"fc.weight"})
