"""Moving weights between two real workers: pulled worker to worker, or forwarded through the
coordinator as raw messages; `coordinator move` measures it."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from coordinator.moves import forward, move
from tests.support import REPO, free_port
from weightrelay import codec
from weightrelay.client import WorkerClient
from weightrelay.v1 import worker_pb2 as pb

pytestmark = pytest.mark.integration


@pytest.fixture
def moved_pair(torch_worker, keras_worker):
    """The torch worker with weights different from keras' (trained a little); both back to the seed's MLP after."""
    torch_worker.client.train_to_end(pb.TrainRequest(max_samples=640, seed=9, learning_rate=0.05))
    yield torch_worker, keras_worker
    for w in (torch_worker, keras_worker):
        w.client.initialize("mlp", 0, "mnist", "")


@pytest.mark.parametrize("via_coordinator,packed", [(False, True), (True, True), (True, False)], ids=["pull", "forward", "forward-unpacked"])
def test_a_move_lands_the_senders_exact_weights(moved_pair, via_coordinator, packed):
    sender, receiver = moved_pair
    expected = sender.client.describe().weights_sha256
    assert receiver.client.describe().weights_sha256 != expected
    assert receiver.client.accepts_packed_pieces  # learnt from its Describe
    receiver.client.accepts_packed_pieces = packed  # as a coordinator would treat an older worker
    done = move(sender.client, receiver.client, via_coordinator, expected, timeout=60)
    assert done.path == ("forward" if via_coordinator else "pull") and done.sha256 == expected
    assert done.bytes == 437544 and done.tensors == 6
    assert receiver.client.describe().weights_sha256 == expected
    sent, received = sender.client.get_weights(), receiver.client.get_weights()
    assert all(sent[n].tobytes() == received[n].tobytes() for n in sent)


def test_pulls_go_on_the_senders_data_channel_unless_it_serves_none(moved_pair, start_worker):
    """Both workers serve a data channel (the default), so a pull's stream goes there, not over gRPC; a sender
    started with --no-data-channel streams over gRPC to the same puller, which asked it for the channel too."""
    sender, receiver = moved_pair
    expected = sender.client.describe().weights_sha256
    assert move(sender.client, receiver.client, expected_sha256=expected, timeout=60).path == "pull"
    log = receiver.process.log_path.read_text()
    assert f"pull from {sender.address}: on its data channel" in log and "over gRPC instead" not in log
    plain = start_worker("torch", extra=["--no-data-channel", "--seed", "5"])
    try:
        expected = plain.client.describe().weights_sha256
        assert move(plain.client, receiver.client, expected_sha256=expected, timeout=60).path == "pull"
        assert receiver.client.describe().weights_sha256 == expected
        log = receiver.process.log_path.read_text()
        assert f"pull from {plain.address}: on its data channel" not in log and "over gRPC instead" not in log
        assert "data channel on" not in plain.process.log_path.read_text()
    finally:
        plain.stop()


def test_forwarding_reads_and_writes_on_the_workers_data_channels(moved_pair):
    """The coordinator's clients read the sender's stream and write the receiver's on their data channels (a client
    that could not reach one would have turned it off, data_channel False, and said so)."""
    sender, receiver = moved_pair
    with WorkerClient(sender.address, timeout=60) as source, WorkerClient(receiver.address, timeout=60) as target:
        assert target.describe().accepts_data_channel
        expected = source.describe().weights_sha256
        assert forward(source, target, timeout=60).sha256 == expected
        assert source.data_channel and target.data_channel
    assert receiver.client.describe().weights_sha256 == expected


def test_a_pull_without_a_deadline(moved_pair):
    """A caller that sets no deadline gets its pull (gRPC reports such calls as having years left)."""
    sender, receiver = moved_pair
    expected = sender.client.describe().weights_sha256
    reply = receiver.client.stub.PullWeights(pb.PullWeightsRequest(address=sender.address, expected_sha256=expected))
    assert reply.sha256 == expected
    assert receiver.client.describe().weights_sha256 == expected


def test_an_unreachable_sender_falls_back_to_forwarding(moved_pair):
    sender, receiver = moved_pair
    unreachable = pb.PullWeightsRequest(address=f"127.0.0.1:{free_port()}")
    with pytest.raises(grpc.RpcError) as info:
        receiver.client.stub.PullWeights(unreachable, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "pulling from 127.0.0.1" in info.value.details()

    elsewhere = WorkerClient(sender.address)  # the sender as the coordinator sees it,
    elsewhere.address = unreachable.address  # at an address the receiver cannot reach
    done = move(elsewhere, receiver.client, timeout=60)
    elsewhere.close()
    assert done.path == "forward" and "UNAVAILABLE" in done.why_forward
    assert receiver.client.describe().weights_sha256 == sender.client.describe().weights_sha256


def test_pulls_keep_their_channel_and_reach_a_restarted_sender(torch_worker, start_worker):
    """The receiver keeps its channel to a peer between pulls; when the peer restarts at the same address,
    the next pull reaches the new process (and gets its weights)."""
    port = free_port()
    first = start_worker("torch", extra=["--port", str(port), "--seed", "11"])
    try:
        first_sha = first.client.describe().weights_sha256
        for _ in range(2):
            assert move(first.client, torch_worker.client, timeout=60).sha256 == first_sha
    finally:
        first.stop()
    with pytest.raises(grpc.RpcError) as info:
        torch_worker.client.stub.PullWeights(pb.PullWeightsRequest(address=f"127.0.0.1:{port}"), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    second = start_worker("torch", extra=["--port", str(port), "--seed", "12"])
    try:
        expected = second.client.describe().weights_sha256
        assert expected != first_sha
        assert move(second.client, torch_worker.client, timeout=60).path == "pull"
        assert torch_worker.client.describe().weights_sha256 == expected
    finally:
        second.stop()
        torch_worker.client.initialize("mlp", 0, "mnist", "")


def test_a_pull_from_the_wrong_worker_is_refused_and_changes_nothing(moved_pair):
    sender, receiver = moved_pair
    before = receiver.client.describe().weights_sha256
    with pytest.raises(grpc.RpcError) as info:
        receiver.client.stub.PullWeights(pb.PullWeightsRequest(address=sender.address, expected_sha256="0" * 64), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is that the right worker" in info.value.details()
    assert receiver.client.describe().weights_sha256 == before


def test_forwarding_passes_a_bad_stream_on_to_be_refused(moved_pair, start_worker):
    """The coordinator never decodes: a sender of another model's weights is refused by the receiver."""
    sender, receiver = moved_pair
    other = start_worker("torch", extra=["--model", "mlp:32"])
    with pytest.raises(grpc.RpcError) as info:
        forward(other.client, receiver.client, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tensor fc1.bias: expected shape [128], got [32]" in info.value.details()


def test_coordinator_move_prints_the_measurement(moved_pair):
    sender, receiver = moved_pair
    done = subprocess.run([sys.executable, "-m", "coordinator", "move", "--from", sender.address, "--to", receiver.address, "--json",
                           "--repeat", "3"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["path"] == "pull" and record["checksum_matches"] and record["bytes"] == 437544
    assert record["repeats"] == 3 and record["seconds"] <= record["median_seconds"]
    assert record["gb_per_second"] > 0 and 0 < record["coordinator_peak_rss_bytes"] < 256 * 2**20
    plain = subprocess.run([sys.executable, "-m", "coordinator", "move", "--from", sender.address, "--to", receiver.address, "--via-coordinator"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert plain.returncode == 0 and "by forward" in plain.stdout and "checksum matches" in plain.stdout


#: 92 MB of float32 weights: over the service's BACKUP_LIMIT_BYTES and DIRECT_READ_BYTES, so moved the way large sets are
LARGE = "mlp:8192,2048"


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_large_sets_land_exactly_and_train_on_in_every_direction(torch_worker, jax_worker, start_worker):
    """A PyTorch worker on the CPU takes a large received set as its model's own memory instead of copying
    it in (adopt_weights), and its previous memory becomes its spare: after several moves each way, with
    training between them and a refused pull among them, every model holds exactly what was sent to it.
    A JAX worker (which copies) sends and takes the same sets."""
    other = start_worker("torch")
    workers = [torch_worker.client, other.client, jax_worker.client]
    try:
        for seed, client in enumerate(workers, 1):
            client.initialize(LARGE, seed=seed)
        first, second, jax = workers
        for turn in range(3):  # each PyTorch worker adopts three sets, handing arenas back and forth
            for sender, receiver in ((first, second), (second, first)):
                sender.train_to_end(pb.TrainRequest(max_steps=2, batch_size=32, learning_rate=0.05, seed=turn))
                sent = sender.get_weights()
                assert move(sender, receiver, via_coordinator=turn == 1, timeout=120).sha256 == sender.describe().weights_sha256
                assert _same(receiver.get_weights(), sent)
        held = first.get_weights()
        with pytest.raises(grpc.RpcError) as info:  # received into the spare, refused: the model keeps its memory
            first.stub.PullWeights(pb.PullWeightsRequest(address=jax_worker.address, expected_sha256="0" * 64), timeout=120)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _same(first.get_weights(), held)
        first.train_to_end(pb.TrainRequest(max_steps=2, batch_size=32, learning_rate=0.05, seed=7))  # trains the adopted memory
        assert not _same(first.get_weights(), held)
        for sender, receiver in ((first, jax), (jax, second)):
            sent = sender.get_weights()
            assert move(sender, receiver, timeout=120).sha256 == sender.describe().weights_sha256
            assert _same(receiver.get_weights(), sent)
    finally:
        other.stop()
        for client in (torch_worker.client, jax_worker.client):
            client.initialize("mlp", 0, "mnist", "")


def test_large_sets_land_exactly_in_and_out_of_the_channels_last_frameworks_and_train_on(torch_worker, keras_worker, jax_worker):
    """Keras and JAX convert a large set once, tile by tile (JAX band by band as it arrives), and take the
    converted arrays as their variables' own memory (Keras through DLPack, JAX by device_put), and send theirs
    converted straight from that memory:
    in every direction between them and PyTorch, with training between (which then updates that memory), each
    model holds exactly what was sent to it; a refused pull leaves a Keras model as it was."""
    torch, keras, jax = torch_worker.client, keras_worker.client, jax_worker.client
    train = pb.TrainRequest(max_steps=2, batch_size=32, learning_rate=0.05, seed=3)
    try:
        for seed, client in enumerate((torch, keras, jax), 1):
            client.initialize(LARGE, seed=seed)
        for sender, receiver, via in ((keras, torch, False), (torch, keras, False), (keras, jax, True), (jax, keras, False), (keras, torch, True)):
            sender.train_to_end(train)  # a Keras sender trains the memory it took in the move before
            sent = sender.get_weights()
            assert move(sender, receiver, via_coordinator=via, timeout=120).sha256 == sender.describe().weights_sha256
            assert _same(receiver.get_weights(), sent)
        held = keras.get_weights()
        with pytest.raises(grpc.RpcError) as info:
            keras.stub.PullWeights(pb.PullWeightsRequest(address=jax_worker.address, expected_sha256="0" * 64), timeout=120)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _same(keras.get_weights(), held) and keras.describe().weights_sha256 == torch.describe().weights_sha256
        held = jax.get_weights()  # a JAX receiver converted the kernels as they came (BandConversion): none applied
        with pytest.raises(grpc.RpcError) as info:
            jax.stub.PullWeights(pb.PullWeightsRequest(address=torch_worker.address, expected_sha256="0" * 64), timeout=120)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _same(jax.get_weights(), held)
        sent = torch.get_weights()  # and the next set is converted again from scratch
        assert move(torch, jax, timeout=120).sha256 == torch.describe().weights_sha256 and _same(jax.get_weights(), sent)
    finally:
        for client in (torch, keras, jax):
            client.initialize("mlp", 0, "mnist", "")


def _pieces_of(messages: list[bytes]) -> list[pb.TensorPiece]:
    chunks = [pb.WeightsChunk.FromString(m) for m in messages]
    return [p for c in chunks for p in (*c.pieces, *([c.piece] if c.WhichOneof("part") == "piece" else []))]


def test_channels_last_workers_move_the_kernels_as_they_hold_them_verified_and_all_or_nothing(torch_worker, keras_worker, jax_worker):
    """Keras, JAX and PyTorch (on the CPU) all hold a large dense kernel in [in, out] memory and say so
    (DescribeReply.receives_transposed): a pull or a forwarded move between any two asks for those kernels as
    held, the sender sends its memory as it is (Tensor.transposed) and the receiver takes the bytes as they come;
    neither transposes. The receiver checks the stream's own checksum, shapes and finite values: each model then
    holds exactly what was sent, trains on, and sends it back. A damaged transposed stream, or a matrix sent
    transposed to a worker that does not take it so, is refused and leaves the model as it was."""
    torch, keras, jax = torch_worker.client, keras_worker.client, jax_worker.client
    train = pb.TrainRequest(max_steps=2, batch_size=32, learning_rate=0.05, seed=4)
    try:
        for seed, client in enumerate((torch, keras, jax), 1):
            client.initialize(LARGE, seed=seed)
        held = {name: client.describe().receives_transposed for name, client in (("torch", torch), ("keras", keras), ("jax", jax))}
        assert list(held["keras"]) == list(held["jax"]) == list(held["torch"]) == ["fc1.weight", "fc2.weight"]
        messages = list(keras.get_weights_serialized(transposed=held["jax"]))
        pieces = _pieces_of(messages)
        assert {p.tensor.name for p in pieces if p.tensor.transposed} == {"fc1.weight", "fc2.weight"}
        digest = pb.WeightsChunk.FromString(messages[-1]).digest
        assert digest.sha256 == keras.describe().weights_sha256 and digest.stream_sha256 not in ("", digest.sha256)
        for sender, receiver, via in ((keras, torch, False), (torch, jax, True), (jax, torch, True), (torch, keras, False),
                                      (keras, jax, False), (jax, keras, True), (keras, jax, True), (jax, keras, False)):
            sender.train_to_end(train)  # trains the memory it took in the move before
            sent = sender.get_weights()
            assert move(sender, receiver, via_coordinator=via, timeout=120).sha256 == sender.describe().weights_sha256
            assert _same(receiver.get_weights(), sent)
        kept = {name: (client.get_weights(), client.describe().weights_sha256) for name, client in (("keras", keras), ("torch", torch))}
        stream = [pb.WeightsChunk.FromString(m) for m in keras.get_weights_serialized(transposed=held["jax"])]
        flipped = next(c for c in stream if c.WhichOneof("part") == "piece" and c.piece.tensor.transposed and c.piece.offset > 0)
        flipped.piece.tensor.data = bytes([flipped.piece.tensor.data[0] ^ 1]) + flipped.piece.tensor.data[1:]
        with pytest.raises(grpc.RpcError) as info:
            jax.set_weights_stream(iter(stream), timeout=120)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream_sha256" in info.value.details()
        assert _same(jax.get_weights(), kept["keras"][0]) and jax.describe().weights_sha256 == kept["keras"][1]
        small = [*held["torch"], "fc3.weight"]  # fc3 [10, 2048]: too small to be held [in, out] by a receiver
        assert {p.tensor.name for p in _pieces_of(list(keras.get_weights_serialized(transposed=small))) if p.tensor.transposed} == set(small)
        with pytest.raises(grpc.RpcError) as info:
            torch.set_weights_serialized(keras.get_weights_serialized(transposed=small), timeout=120)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sent transposed, which this receiver does not take" in info.value.details()
        assert "fc3.weight" in info.value.details()
        assert _same(torch.get_weights(), kept["torch"][0]) and torch.describe().weights_sha256 == kept["torch"][1]
        assert move(jax, torch, timeout=120).sha256 == kept["keras"][1]
        assert _same(torch.get_weights(), kept["keras"][0])
        canonical = list(torch.get_weights_serialized())  # a reader that asks for nothing transposed: [out, in] bytes
        assert not any(p.tensor.transposed for p in _pieces_of(canonical))
        arrived, sha = codec.receive_weights(pb.WeightsChunk.FromString(m) for m in canonical)  # checks the digest too
        assert sha == kept["keras"][1] and _same(arrived, kept["keras"][0])
    finally:
        for client in (torch, keras, jax):
            client.initialize("mlp", 0, "mnist", "")


@pytest.mark.parametrize("framework", ["torch", "keras", "jax"])
def test_a_large_set_read_slowly_leaves_the_model_to_other_calls_and_arrives_as_it_was(framework, request, start_worker):
    """A large set streams straight from the model's memory (store.DirectRead: PyTorch's parameters as they
    are, Keras' and JAX's kernels transposed band by band as the stream goes) while the model is held; a
    call that wants the model meanwhile (a SetWeights, a Train, a second GetWeights) gets it without
    waiting for the slow reader, and the reader still receives the weights of when it started."""
    other = start_worker(framework)
    worker = request.getfixturevalue(f"{framework}_worker").client
    try:
        worker.initialize(LARGE, seed=1)
        other.client.initialize(LARGE, seed=2)
        before, replacement = worker.get_weights(), other.client.get_weights()
        expected = worker.describe().weights_sha256
        for interrupt in ("set", "train", "get", "cancel"):
            worker.initialize(LARGE, seed=1)
            slow = worker.stub.GetWeights(pb.GetWeightsRequest(), timeout=120)
            first = next(slow)  # the rest waits in gRPC's buffers and the server's generator
            if interrupt == "set":
                assert worker.set_weights(replacement, timeout=30).sha256 == other.client.describe().weights_sha256
                assert _same(worker.get_weights(), replacement)
            elif interrupt == "train":
                worker.train_to_end(pb.TrainRequest(max_steps=1, batch_size=32, learning_rate=0.05), timeout=60)
                assert not _same(worker.get_weights(), before)
            elif interrupt == "get":
                assert _same(worker.get_weights(timeout=60), before)
            else:
                slow.cancel()
                assert worker.set_weights(replacement, timeout=30).sha256 == other.client.describe().weights_sha256
                continue
            arrived, sha = codec.receive_weights([first, *slow])
            assert sha == expected and _same(arrived, before)
    finally:
        other.stop()
        worker.initialize("mlp", 0, "mnist", "")
