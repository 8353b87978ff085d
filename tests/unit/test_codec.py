import dataclasses
import hashlib
import queue

import ml_dtypes
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from weightrelay import codec
from tests.support import seed_manifest as canonical_manifest
from weightrelay.v1 import worker_pb2 as pb

RNG = np.random.default_rng(0)


def sample(dtype: str, shape=(3, 5)) -> np.ndarray:
    if dtype == "bool":
        return RNG.random(shape) > 0.5
    if dtype in ("int32", "int64", "int8", "uint8"):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    values = RNG.standard_normal(shape).astype(np.float32) * 100
    values.flat[:3] = [np.inf, -0.0, 1e-8]
    return values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


@pytest.mark.parametrize("dtype", codec.SUPPORTED_DTYPES)
def test_tensor_round_trip_every_dtype(dtype):
    array = sample(dtype)
    message = codec.to_proto("t", array)
    assert pb.DType.Name(message.dtype).lower() == dtype
    assert list(message.shape) == [3, 5]
    assert len(message.data) == array.nbytes
    back = codec.from_proto(pb.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # bit-exact, signed zeros and infinities included


def test_bfloat16_bytes_are_the_upper_half_of_float32():
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    encoded = codec.tensor_bytes(values.astype(ml_dtypes.bfloat16))
    upper = (values.view("<u4") >> 16).astype("<u2").tobytes()
    assert encoded == upper


def test_big_endian_arrays_are_sent_little_endian():
    native = np.arange(6, dtype="<f4").reshape(2, 3)
    assert codec.tensor_bytes(native.astype(">f4")) == native.tobytes()
    assert codec.tensor_bytes(np.asfortranarray(native)) == native.tobytes()  # C order on the wire


def test_unset_dtype_is_refused_with_the_tensor_name():
    with pytest.raises(codec.TensorError, match="tensor w: dtype 0 is not set"):
        codec.from_proto(pb.Tensor(name="w", shape=[1], data=b"\0\0\0\0"))


def weights() -> dict[str, np.ndarray]:
    return {spec.name: RNG.standard_normal(spec.shape).astype(np.float32) for spec in canonical_manifest().values()}


def test_weight_stream_round_trip_in_small_pieces():
    original = weights()
    chunks = list(codec.iter_weight_chunks(original, max_chunk_bytes=10_000))
    pieces = [c for c in chunks if c.WhichOneof("part") == "piece"]
    assert len(pieces) > len(original)  # fc1.weight (401,408 bytes) is split
    assert all(len(c.piece.tensor.data) <= 10_000 for c in pieces)
    assert chunks[-1].WhichOneof("part") == "digest"
    assert [c.piece.tensor.name for c in pieces] == sorted(c.piece.tensor.name for c in pieces)  # name order: hashed as it arrives
    back = codec.assemble_weights(chunks, canonical_manifest())
    assert sorted(back) == sorted(original)
    assert all(back[n].tobytes() == original[n].tobytes() for n in original)


def test_a_stream_in_another_order_is_accepted_and_verified():
    original = weights()
    chunks = list(codec.iter_weight_chunks(original, max_chunk_bytes=100_000))
    pieces, digest = chunks[:-1], chunks[-1]
    shuffled = list(reversed([p for p in pieces if p.piece.tensor.name != "fc1.weight"])) + [p for p in pieces if p.piece.tensor.name == "fc1.weight"]
    back, sha = codec.receive_weights(shuffled + [digest], canonical_manifest())
    assert sha == codec.weights_sha256(original) and all(back[n].tobytes() == original[n].tobytes() for n in original)


def test_the_sender_may_pass_the_checksum_it_keeps():
    original = weights()
    chunks = list(codec.iter_weight_chunks(original, sha256="ab" * 32))
    assert chunks[-1].digest.sha256 == "ab" * 32
    with pytest.raises(codec.TensorError, match="checksum mismatch"):
        codec.assemble_weights(chunks)


def test_default_chunks_fit_grpcs_default_message_limit():
    big = {"big": np.zeros((3, 1024, 1024), dtype=np.float32)}  # 12 MiB
    sizes = [c.ByteSize() for c in codec.iter_weight_chunks(big)]
    pieces = -(-big["big"].nbytes // codec.MAX_CHUNK_BYTES)
    assert len(sizes) == pieces + 1  # the pieces, then the digest
    assert max(sizes) < 4 * 1024 * 1024


def test_checksum_ignores_order_but_not_content():
    w = weights()
    reordered = dict(reversed(list(w.items())))
    assert codec.weights_sha256(w) == codec.weights_sha256(reordered)
    changed = dict(w, **{"fc3.bias": w["fc3.bias"] + np.float32(1e-6)})
    assert codec.weights_sha256(changed) != codec.weights_sha256(w)


# Every dtype, 0-d and empty tensors, and one tensor whose single piece is large enough for the hashing thread.
HASHED = [("scalar", "float32", ()), ("empty", "float64", (0,)), ("empty2d", "int8", (3, 0)), ("bf", "bfloat16", (5, 2)),
          ("half", "float16", (7,)), ("flags", "bool", (2, 3)), ("i32", "int32", (4, 1)), ("i64", "int64", (4,)),
          ("u8", "uint8", (9,)), ("big", "float32", (300, 1100))]


def hashed_set() -> dict[str, np.ndarray]:
    return {name: np.asarray(sample(dtype, shape)) for name, dtype, shape in HASHED}


def contract_sha256(weights: dict[str, np.ndarray]) -> str:
    """The set checksum as worker.proto words it, written out here without the codec (on a little-endian machine)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = weights[name]
        digest.update(f"{name}\0{array.dtype.name.upper()}\0{','.join(map(str, array.shape))}\0".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def whole_set_hash_refused(weights, transposed=frozenset()):
    pytest.fail("receive_weights hashed the whole set: the in-order stream was not hashed as it came")


@pytest.mark.parametrize("chunk, pack", [(0, False), (1000, False), (0, True)])
def test_the_streaming_hash_is_the_whole_set_hash(chunk, pack, monkeypatch):
    weights = hashed_set()
    assert {codec.tensors.dtype_name(a.dtype) for a in weights.values()} == set(codec.SUPPORTED_DTYPES)
    assert weights["scalar"].shape == () and weights["empty"].size == 0
    expected = codec.weights_sha256(weights)
    assert expected == contract_sha256(weights)
    encoded = list(codec.encode_weight_chunks(weights, chunk, pack=pack))
    monkeypatch.setattr(codec.stream, "stream_sha256", whole_set_hash_refused)  # only the streaming hash may answer
    back, streamed = codec.receive_weights(codec.decode_chunk(m) for m in encoded)
    assert streamed == expected
    assert all(back[n].tobytes() == weights[n].tobytes() and back[n].shape == weights[n].shape for n in weights)


def test_the_background_hash_lets_only_a_few_pieces_wait_and_hashes_them_all():
    """A feeder faster than the hash waits for it: never more than the limit, plus the one piece that may always
    wait, is queued (each held piece is a stream message kept from reuse), and the digest is hashlib's."""
    from weightrelay.codec.checksum import BackgroundHash

    pieces = [bytes([i]) * (1 << (20 + i % 3)) for i in range(40)]  # 1, 2 and 4 MiB
    hasher = BackgroundHash(pending_bytes=3 << 20)
    queued = []

    class Watched(queue.SimpleQueue):
        def put(self, data):
            if data is not None:
                queued.append(hasher._pending)  # bytes waiting, this piece's included
            super().put(data)

    hasher._queue = Watched()
    for piece in pieces:
        hasher.update(piece)
    assert hasher.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert len(queued) == len(pieces) and max(queued) < (3 << 20) + (4 << 20)


def test_the_checksum_covers_each_tensors_header():
    """The same bytes under another name, shape or dtype are another set: both hashes tell them apart."""
    weights = hashed_set()
    i32 = weights["i32"]
    others = {
        "renamed": {("i33" if n == "i32" else n): a for n, a in weights.items()},
        "reshaped": dict(weights, i32=i32.reshape(2, 2)),
        "retyped": dict(weights, i32=i32.view(np.float32)),
        "scalar as [1]": dict(weights, scalar=weights["scalar"].reshape(1)),
    }
    checksums = {codec.weights_sha256(weights)}
    for label, other in others.items():
        streamed = codec.receive_weights(codec.decode_chunk(m) for m in codec.encode_weight_chunks(other))[1]
        assert streamed == codec.weights_sha256(other) == contract_sha256(other), label
        checksums.add(streamed)
    assert len(checksums) == 1 + len(others)


def test_a_header_built_another_way_in_the_stream_fails_the_checksum(monkeypatch):
    """What the agreement test guards: a streaming header that differs from the whole-set one by a byte
    makes every in-order stream fail its checksum."""
    weights = hashed_set()
    encoded = list(codec.encode_weight_chunks(weights))
    header = codec.checksum.stream_header
    monkeypatch.setattr(codec.stream, "stream_header", lambda spec, transposed: header(spec, transposed)[:-1])
    with pytest.raises(codec.TensorError, match="checksum mismatch"):
        codec.receive_weights(codec.decode_chunk(m) for m in encoded)


def stream_with(mutate) -> list[pb.WeightsChunk]:
    chunks = list(codec.iter_weight_chunks(weights(), max_chunk_bytes=100_000))
    mutate(chunks)
    return chunks


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop(), "without its digest"),
        (lambda c: c.append(c[0]), "goes on after its digest"),
        (lambda c: c.__setitem__(3, c[4]), "expected offset"),
        (lambda c: setattr(c[-1].digest, "sha256", "0" * 64), "checksum mismatch"),
        (lambda c: setattr(c[-1].digest, "total_bytes", 5), "digest says"),
        (lambda c: next(p for p in c if p.piece.tensor.name == "fc1.weight").piece.tensor.shape.__setitem__(0, 784),
         r"expected shape \[128, 784\], got \[784, 784\]"),
    ],
    ids=["no-digest", "after-digest", "out-of-order", "checksum", "digest-count", "shape"],
)
def test_malformed_streams_are_refused(mutate, message):
    with pytest.raises(codec.TensorError, match=message):
        codec.assemble_weights(stream_with(mutate), canonical_manifest())


def test_manifest_checks_name_the_tensor_and_the_expectation():
    manifest = canonical_manifest()
    w = weights()
    transposed = dict(w, **{"fc1.weight": w["fc1.weight"].T.copy()})
    with pytest.raises(codec.TensorError, match=r"tensor fc1.weight: expected shape \[128, 784\], got \[784, 128\]"):
        codec.assemble_weights(codec.iter_weight_chunks(transposed), manifest)
    doubled = dict(w, **{"fc2.bias": w["fc2.bias"].astype(np.float64)})
    with pytest.raises(codec.TensorError, match="tensor fc2.bias: expected dtype FLOAT32, got FLOAT64"):
        codec.assemble_weights(codec.iter_weight_chunks(doubled), manifest)
    renamed = {("fc9.bias" if n == "fc3.bias" else n): a for n, a in w.items()}
    with pytest.raises(codec.TensorError, match="unexpected tensor fc9.bias"):
        codec.assemble_weights(codec.iter_weight_chunks(renamed), manifest)
    nan = dict(w, **{"fc3.weight": w["fc3.weight"].copy()})
    nan["fc3.weight"][2, 5] = np.nan
    with pytest.raises(codec.TensorError, match=r"tensor fc3.weight: 1 non-finite value\(s\).*index \[2, 5\]"):
        codec.assemble_weights(codec.iter_weight_chunks(nan), manifest)
    missing = {n: a for n, a in w.items() if n != "fc2.weight"}
    with pytest.raises(codec.TensorError, match="missing tensor.*fc2.weight"):
        codec.assemble_weights(codec.iter_weight_chunks(missing), manifest)


def test_short_tensor_data_is_refused_with_byte_counts():
    chunks = list(codec.iter_weight_chunks(weights()))
    bias = next(c for c in chunks if c.WhichOneof("part") == "piece" and c.piece.tensor.name == "fc3.bias")
    bias.piece.tensor.data = bias.piece.tensor.data[:-4]
    with pytest.raises(codec.TensorError, match=r"tensor fc3.bias: received 36 bytes, expected 40 \(shape \[10\] of FLOAT32\)"):
        codec.assemble_weights(chunks, canonical_manifest())


@pytest.mark.parametrize("chunk", [0, 70_000])
def test_encoded_stream_is_byte_for_byte_the_serialized_messages(chunk):
    weights = {name: sample(dtype, shape) for name, dtype, shape in [
        ("b", "float32", (300, 70)), ("a", "bfloat16", (5,)), ("c", "int8", (0, 3)), ("d", "float64", (40_000,))]}
    encoded = list(codec.encode_weight_chunks(weights, chunk))
    assert encoded == [m.SerializeToString() for m in codec.iter_weight_chunks(weights, chunk)]
    back, sha = codec.receive_weights(pb.WeightsChunk.FromString(m) for m in encoded)
    assert sha == codec.weights_sha256(weights) and all(back[n].tobytes() == weights[n].tobytes() for n in weights)


def test_large_sets_are_hashed_beside_the_receive_and_still_checked():
    weights = {"big": RNG.standard_normal((1000, 700)).astype(np.float32), "small": sample("float32")}
    chunks = list(codec.iter_weight_chunks(weights, 1_200_000))  # pieces large enough for the hashing thread
    assert codec.receive_weights(iter(chunks))[1] == codec.weights_sha256(weights)
    chunks[1].piece.tensor.data = chunks[1].piece.tensor.data[:-4] + b"\0\0\0\0"
    with pytest.raises(codec.TensorError, match="checksum mismatch"):
        codec.receive_weights(iter(chunks))


def test_a_non_finite_value_past_the_first_block_is_found():
    values = np.zeros(3 * codec.tensors._FINITE_BLOCK + 7, dtype=np.float32)
    codec.check_finite("w", values)
    values[2 * codec.tensors._FINITE_BLOCK + 5] = np.nan
    with pytest.raises(codec.TensorError, match=rf"tensor w: 1 non-finite value\(s\) \(NaN or Inf\), the first at index \[{2 * codec.tensors._FINITE_BLOCK + 5}\]"):
        codec.check_finite("w", values)


PACKABLE = [("b", "float32", (300, 70)), ("a", "bfloat16", (5,)), ("c", "int8", (0, 3)), ("d", "float64", (40_000,)), ("e", "float32", (7,))]


@pytest.mark.parametrize("chunk", [0, 70_000, 200_000])
def test_packed_streams_are_the_serialized_messages_in_fewer_of_them(chunk):
    weights = {name: sample(dtype, shape) for name, dtype, shape in PACKABLE}
    packed = list(codec.encode_weight_chunks(weights, chunk, pack=True))
    assert packed == [m.SerializeToString() for m in codec.iter_weight_chunks(weights, chunk, pack=True)]
    assert len(packed) < len(list(codec.encode_weight_chunks(weights, chunk)))
    assert all(len(m) <= 4 * 1024 * 1024 for m in packed)  # gRPC's default message limit
    assert [codec.holds_digest(m) for m in packed] == [False] * (len(packed) - 1) + [True]
    back, sha = codec.receive_weights(pb.WeightsChunk.FromString(m) for m in packed)
    assert sha == codec.weights_sha256(weights) and all(back[n].tobytes() == weights[n].tobytes() for n in weights)


def test_a_small_set_packs_into_one_message_with_its_digest():
    original = weights()
    (only,) = codec.iter_weight_chunks(original, pack=True)
    assert only.WhichOneof("part") == "digest" and [p.tensor.name for p in only.pieces] == sorted(original)
    back = codec.assemble_weights([only], canonical_manifest())
    assert all(back[n].tobytes() == original[n].tobytes() for n in original)
    assert not any(codec.holds_digest(m) for m in list(codec.encode_weight_chunks(original))[:-1])


def test_a_messages_packed_pieces_come_before_its_part():
    original = weights()
    pieces = [c.piece for c in codec.iter_weight_chunks(original) if c.WhichOneof("part") == "piece"]
    mixed = [pb.WeightsChunk(pieces=pieces[:-1], piece=pieces[-1]), next(codec.iter_weight_chunks({}, sha256="x"))]
    mixed[-1].digest.CopyFrom(pb.WeightsDigest(tensor_count=len(original), total_bytes=sum(a.nbytes for a in original.values()),
                                               sha256=codec.weights_sha256(original)))
    assert codec.receive_weights(mixed, canonical_manifest())[1] == codec.weights_sha256(original)
    after_digest = list(codec.iter_weight_chunks(original, pack=True)) + [pb.WeightsChunk(pieces=pieces[:1])]
    with pytest.raises(codec.TensorError, match="goes on after its digest"):
        codec.receive_weights(after_digest, canonical_manifest())
    assert list(codec.until_digest(iter(after_digest))) == after_digest[:-1]  # a pull stops reading there


def test_same_bytes_compares_bits():
    a = np.array([0.0, 1.5, np.inf], dtype=np.float32)
    assert codec.same_bytes(a, a.copy())
    assert not codec.same_bytes(a, np.array([-0.0, 1.5, np.inf], dtype=np.float32))  # equal values, other bits
    assert not codec.same_bytes(a, a.astype(np.float64)) and not codec.same_bytes(a, a[:2])


def _read(message: codec.StreamMessage) -> tuple:
    """A StreamMessage as plain values, its pieces' bytes copied (a view and bytes compare alike)."""
    pieces = tuple((p.name, p.dtype, p.shape, p.offset, bytes(p.data)) for p in message.pieces)
    return pieces, message.digest


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("chunk", [0, 70_000])
def test_decode_chunk_reads_what_senders_write_without_copying_the_tensor_bytes(chunk, pack):
    weights = {name: sample(dtype, shape) for name, dtype, shape in PACKABLE}
    for message in codec.encode_weight_chunks(weights, chunk, pack=pack):
        decoded = codec.decode_chunk(message)
        assert _read(decoded) == _read(codec.stream_message(pb.WeightsChunk.FromString(message)))
        assert all(isinstance(p.data, memoryview) for p in decoded.pieces if len(p.data))  # the fast path, not protobuf's
    back, sha = codec.receive_weights(codec.decode_chunk(m) for m in codec.encode_weight_chunks(weights, chunk, pack=pack))
    assert sha == codec.weights_sha256(weights) and all(back[n].tobytes() == weights[n].tobytes() for n in weights)


def test_decode_chunk_reads_protobufs_own_serialization_of_odd_values():
    tensor = pb.Tensor(name="é.weight", dtype=-3, shape=[-1, 2**62, 0], data=b"\x00\x01")
    piece = pb.TensorPiece(tensor=tensor, offset=2**64 - 1)
    for message in (pb.WeightsChunk(piece=piece, pieces=[piece, pb.TensorPiece()]),
                    pb.WeightsChunk(digest=pb.WeightsDigest(tensor_count=2**32 - 1, total_bytes=2**64 - 1, sha256="ü")),
                    pb.WeightsChunk()):
        data = message.SerializeToString()
        assert _read(codec.decode_chunk(data)) == _read(codec.stream_message(message))


def test_bytes_protobuf_reads_another_way_are_read_by_protobuf():
    """Fields repeated or out of order, unknown fields, a oneof set twice: protobuf's parser decides."""
    piece = pb.TensorPiece(tensor=pb.Tensor(name="w", dtype=pb.FLOAT32, shape=[1], data=b"abcd"))
    digest = pb.WeightsChunk(digest=pb.WeightsDigest(tensor_count=1, total_bytes=4, sha256="s")).SerializeToString()
    as_piece = pb.WeightsChunk(piece=piece).SerializeToString()
    renamed = pb.WeightsChunk(piece=pb.TensorPiece(tensor=pb.Tensor(name="v"))).SerializeToString()
    for data in (digest + as_piece, as_piece + digest, as_piece + renamed, b"\x08\x01" + as_piece, as_piece + b"\x2a\x00"):
        expected = pb.WeightsChunk.FromString(data)
        assert _read(codec.decode_chunk(data)) == _read(codec.stream_message(expected))
    with pytest.raises(DecodeError):
        codec.decode_chunk(as_piece[:-1])
    with pytest.raises(DecodeError):
        codec.decode_chunk(pb.WeightsChunk(piece=pb.TensorPiece(tensor=pb.Tensor(name="w"))).SerializeToString().replace(b"w", b"\xff"))


TENSOR_PIECES = st.builds(
    lambda name, dtype, shape, data, offset: pb.TensorPiece(tensor=pb.Tensor(name=name, dtype=dtype, shape=shape, data=data), offset=offset),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), st.integers(-(2**31), 2**31 - 1),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4), st.binary(max_size=40), st.integers(0, 2**64 - 1))
DIGESTS = st.builds(pb.WeightsDigest, tensor_count=st.integers(0, 2**32 - 1), total_bytes=st.integers(0, 2**64 - 1),
                    sha256=st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))
CHUNKS = st.one_of(
    st.builds(lambda pieces, piece: pb.WeightsChunk(pieces=pieces, piece=piece), st.lists(TENSOR_PIECES, max_size=3), TENSOR_PIECES),
    st.builds(lambda pieces, digest: pb.WeightsChunk(pieces=pieces, digest=digest), st.lists(TENSOR_PIECES, max_size=3), DIGESTS),
    st.builds(lambda pieces: pb.WeightsChunk(pieces=pieces), st.lists(TENSOR_PIECES, max_size=3)),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(CHUNKS, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])), max_size=3))
def test_decode_chunk_and_protobuf_read_every_input_alike(message, edits):
    """Valid messages, and the same with bytes changed, inserted or deleted: decode_chunk gives what protobuf
    decodes, or fails where protobuf fails."""
    data = bytearray(message.SerializeToString())
    for position, value, edit in edits:
        position %= len(data) + 1
        if edit == "insert":
            data.insert(position, value)
        elif position < len(data):
            if edit == "set":
                data[position] = value
            else:
                del data[position]
    data = bytes(data)
    try:
        expected = pb.WeightsChunk.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            codec.decode_chunk(data)
        return
    assert _read(codec.decode_chunk(data)) == _read(codec.stream_message(expected))


@pytest.mark.parametrize("chunk", [0, 65_537])  # one piece; pieces that split float64 values between them
def test_non_finite_values_in_pieces_that_split_values_are_found_and_named(chunk):
    values = {"a": RNG.standard_normal(3 * codec.tensors._FINITE_BLOCK // 2), "b": RNG.standard_normal((300, 400)).astype(np.float16)}
    manifest = {name: codec.TensorSpec.of(name, array) for name, array in values.items()}
    assert codec.assemble_weights(codec.iter_weight_chunks(values, chunk), manifest).keys() == values.keys()
    for name, index, flat in (("a", (codec.tensors._FINITE_BLOCK + 3,), codec.tensors._FINITE_BLOCK + 3), ("b", (299, 399), 300 * 400 - 1)):
        bad = {n: v.copy() for n, v in values.items()}
        bad[name].reshape(-1)[flat] = np.inf
        decoded = [codec.decode_chunk(m) for m in codec.encode_weight_chunks(bad, chunk)]
        with pytest.raises(codec.TensorError, match=rf"tensor {name}: 1 non-finite value\(s\) \(NaN or Inf\), the first at index \[{', '.join(map(str, index))}\]"):
            codec.receive_weights(decoded, manifest)
        digest = codec.StreamMessage((), dataclasses.replace(decoded[-1].digest, sha256="0" * 64))
        with pytest.raises(codec.TensorError, match="checksum mismatch"):  # a damaged stream is named as such first
            codec.receive_weights(decoded[:-1] + [digest], manifest)


@pytest.mark.parametrize("band", [32 << 20, 30_000])
@pytest.mark.parametrize("chunk", [0, 70_000, 5_000, 4_096])
def test_a_transposed_view_goes_out_as_the_canonical_matrix_band_by_band(chunk, band, monkeypatch):
    """A framework's [in, out] kernel seen as [out, in] (a view whose transpose is contiguous, as Keras and
    JAX senders lend it) streams as the C-order bytes of that view: pieces of whole rows where a row fits,
    a row split where it does not, the same messages and checksum as a contiguous copy of it."""
    kernels = {"fc.weight": RNG.standard_normal((700, 300)).astype(np.float32),  # seen as [300, 700]: 2800 bytes a row
               "wide.weight": RNG.standard_normal((1500, 2)).astype(np.float64)}  # [2, 1500]: 12000 bytes a row, split below that
    monkeypatch.setattr(codec.wire, "BAND_BYTES", band)  # one band, or several
    views = {name: kernel.T for name, kernel in kernels.items()}
    copies = {name: np.ascontiguousarray(view) for name, view in views.items()}
    assert all(not v.flags.c_contiguous for v in views.values())
    sha = codec.weights_sha256(copies)
    encoded = list(codec.encode_weight_chunks(views, chunk, sha256=sha))
    back, received_sha = codec.receive_weights(pb.WeightsChunk.FromString(m) for m in encoded)
    assert received_sha == sha and all(back[n].tobytes() == copies[n].tobytes() for n in copies)
    limit = codec.MAX_CHUNK_BYTES if chunk == 0 else max(chunk, 0)
    pieces = [pb.WeightsChunk.FromString(m).piece for m in encoded[:-1]]
    assert all(len(p.tensor.data) <= limit for p in pieces)
    row_bytes = {"fc.weight": 700 * 4, "wide.weight": 1500 * 8}
    whole_rows = [p for p in pieces if row_bytes[p.tensor.name] <= limit]
    assert whole_rows and all(p.offset % row_bytes[p.tensor.name] == 0 for p in whole_rows)
