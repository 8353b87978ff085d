"""Generated bad requests against a real worker (Hypothesis): every one gets the documented status,
and after every one the worker still serves with its weights unchanged."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from weightrelay import codec
from weightrelay.v1 import worker_pb2 as pb

pytestmark = pytest.mark.integration

TEXT = st.characters(blacklist_categories=("Cs",))  # protobuf strings are UTF-8: no lone surrogates
STREAMS = 2000
REQUESTS = 400
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def target(torch_worker):
    """The worker, its weights (+1, so a partial write would show) as a valid stream, and a health stub."""
    weights = {name: array + np.float32(1) for name, array in torch_worker.client.get_weights().items()}
    chunks = list(codec.iter_weight_chunks(weights, 100_000))
    channel = grpc.insecure_channel(torch_worker.address)
    yield torch_worker, chunks, health_pb2_grpc.HealthStub(channel)
    channel.close()


def copy(chunk: pb.WeightsChunk) -> pb.WeightsChunk:
    return pb.WeightsChunk.FromString(chunk.SerializeToString())


def _pieces(chunks):
    return [i for i, c in enumerate(chunks) if not isinstance(c, bytes) and c.WhichOneof("part") == "piece"]


def is_valid(stream: list[bytes], manifest) -> bool:
    """Whether defects cancelled out (a piece duplicated, then the copy dropped): such a stream is not bad."""
    try:
        codec.receive_weights((pb.WeightsChunk.FromString(m) for m in stream), manifest)
    except Exception:
        return False
    return True


@st.composite
def bad_streams(draw, valid: list[pb.WeightsChunk]) -> list:
    """A valid stream with one or more defects; each defect alone makes it invalid."""
    chunks = [copy(c) for c in valid]
    defects = draw(st.lists(st.sampled_from([
        "drop_piece", "duplicate_piece", "rename", "dtype", "shape", "truncate", "extend", "offset",
        "no_digest", "after_digest", "digest_count", "digest_bytes", "digest_sha", "nan", "garbage", "empty_piece_name",
    ]), min_size=1, max_size=3))
    for defect in defects:
        pieces = _pieces(chunks)
        if not pieces:
            chunks.insert(0, pb.WeightsChunk())
            continue
        i = draw(st.sampled_from(pieces))
        piece = chunks[i].piece
        if defect == "drop_piece":
            del chunks[i]
        elif defect == "duplicate_piece":
            chunks.insert(i, copy(chunks[i]))
        elif defect == "rename":
            piece.tensor.name = draw(st.text(TEXT, min_size=1, max_size=300).filter(lambda n: n != piece.tensor.name))
        elif defect == "dtype":
            piece.tensor.dtype = draw(st.integers(0, 40).filter(lambda d: d != pb.FLOAT32))
        elif defect == "shape":
            shape = draw(st.lists(st.integers(-3, 1 << 40), max_size=5).filter(lambda s: s != list(piece.tensor.shape)))
            del piece.tensor.shape[:]
            piece.tensor.shape.extend(shape)
        elif defect == "truncate" and piece.tensor.data:
            piece.tensor.data = piece.tensor.data[: draw(st.integers(0, len(piece.tensor.data) - 1))]
        elif defect == "extend":
            piece.tensor.data += draw(st.binary(min_size=1, max_size=64))
        elif defect == "offset":
            piece.offset = draw(st.integers(0, 1 << 62).filter(lambda o: o != piece.offset))
        elif defect == "no_digest":
            chunks = [c for c in chunks if isinstance(c, bytes) or c.WhichOneof("part") != "digest"]
        elif defect == "after_digest":
            chunks.append(copy(chunks[i]))
        elif defect in ("digest_count", "digest_bytes", "digest_sha"):
            for c in chunks:
                if not isinstance(c, bytes) and c.WhichOneof("part") == "digest":
                    if defect == "digest_count":
                        c.digest.tensor_count += draw(st.integers(1, 1000))
                    elif defect == "digest_bytes":
                        c.digest.total_bytes += draw(st.integers(1, 1 << 40))
                    else:
                        c.digest.sha256 = draw(st.text(TEXT, max_size=80).filter(lambda t: t != c.digest.sha256))
        elif defect == "nan":
            data = bytearray(piece.tensor.data)
            if len(data) >= 4:
                at = draw(st.integers(0, len(data) // 4 - 1)) * 4
                data[at : at + 4] = np.float32(draw(st.sampled_from([math.nan, math.inf, -math.inf]))).tobytes()
                piece.tensor.data = bytes(data)
        elif defect == "garbage":
            chunks.insert(i, b"\x0f" + draw(st.binary(max_size=20)))  # not a protobuf message at all
        elif defect == "empty_piece_name":
            piece.tensor.name = ""
    if draw(st.booleans()):  # the same defects in a packed stream
        chunks = packed(chunks, draw(st.integers(2, 5)))
    return [c if isinstance(c, bytes) else c.SerializeToString() for c in chunks]


def packed(chunks: list, most: int) -> list:
    """Runs of piece messages packed, up to `most` pieces a message, with a digest that follows joining the
    last (worker.proto's packed form): the pieces stay in order, so the stream means what it meant."""
    out: list = []
    for c in chunks:
        kind = None if isinstance(c, bytes) else c.WhichOneof("part")
        last = out[-1] if out and not isinstance(out[-1], bytes) and out[-1].pieces and out[-1].WhichOneof("part") is None else None
        if kind == "piece" and last is not None and len(last.pieces) < most:
            last.pieces.append(c.piece)
        elif kind == "digest" and last is not None:
            last.digest.CopyFrom(c.digest)
        elif kind == "piece":
            out.append(pb.WeightsChunk(pieces=[c.piece]))
        else:
            out.append(c)
    return out


def assert_unharmed(worker, health, sha: str) -> None:
    assert health.Check(health_pb2.HealthCheckRequest(service="weightrelay.v1.Worker"), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert worker.client.describe(timeout=5).weights_sha256 == sha


def test_generated_bad_weight_streams_are_refused_and_change_nothing(target):
    worker, valid, health = target
    described = worker.client.describe()
    sha, manifest = described.weights_sha256, {p.name: codec.spec_from_proto(p) for p in described.parameters}
    send = worker.client.channel.stream_unary("/weightrelay.v1.Worker/SetWeights")
    seen = []

    @settings(max_examples=STREAMS, **SETTINGS)
    @given(st.data())
    def check(data):
        stream = data.draw(bad_streams(valid))
        assume(not is_valid(stream, manifest))
        with pytest.raises(grpc.RpcError) as info:
            send(iter(stream), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert 0 < len(info.value.details()) <= 1024
        assert_unharmed(worker, health, sha)
        seen.append(any(m[:1] == b"\x1a" for m in stream))  # a message that starts with packed pieces (field 3)

    check()
    assert len(seen) >= STREAMS and sum(seen) >= STREAMS // 4


BAD_TRAIN = st.one_of(
    st.builds(pb.TrainRequest, learning_rate=st.one_of(st.floats(min_value=100.0001, allow_infinity=True), st.floats(max_value=-1e-300),
                                                        st.just(math.nan))),
    st.builds(pb.TrainRequest, momentum=st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-300), st.just(math.nan))),
    st.builds(pb.TrainRequest, epochs=st.integers(1001, 2**32 - 1)),
    st.builds(pb.TrainRequest, batch_size=st.integers(60001, 2**32 - 1)),
    st.builds(pb.TrainRequest, objective=st.text(TEXT, min_size=1, max_size=2000).filter(
        lambda t: t.strip().lower() not in ("identity", "id", "none") and not t.strip().lower().startswith(("swap:", "perm:", "permutation:")))),
)


def test_generated_bad_train_and_evaluate_requests_are_refused(target):
    worker, _, health = target
    sha = worker.client.describe().weights_sha256
    train = worker.client.channel.unary_stream("/weightrelay.v1.Worker/Train")
    evaluate = worker.client.channel.unary_unary("/weightrelay.v1.Worker/Evaluate")
    seen = []

    @settings(max_examples=REQUESTS, **SETTINGS)
    @given(st.one_of(BAD_TRAIN.map(lambda r: ("Train", r.SerializeToString())),
                     st.binary(max_size=40).map(lambda b: ("Train", b"\x0f" + b)),
                     st.binary(max_size=40).map(lambda b: ("Evaluate", b"\x0f" + b))))
    def check(case):
        method, payload = case
        with pytest.raises(grpc.RpcError) as info:
            list(train(payload, timeout=30)) if method == "Train" else evaluate(payload, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
        assert len(info.value.details()) <= 1024
        assert_unharmed(worker, health, sha)
        seen.append(method)

    check()
    assert len(seen) >= REQUESTS and {"Train", "Evaluate"} <= set(seen)
