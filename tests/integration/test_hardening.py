"""A worker left running as a service: abandoned calls, stalled streams, bad values, signals,
TLS and tokens. Real worker processes, real gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import REPO, wait_until_free
from weightrelay import codec
from weightrelay.client import WorkerClient
from weightrelay.security import ClientSecurity
from weightrelay.v1 import worker_pb2 as pb
from weightrelay.v1 import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def sha(worker) -> str:
    return worker.client.describe().weights_sha256


def health(address: str, security: ClientSecurity | None = None, timeout: float = 1.0) -> int:
    with (security or ClientSecurity()).channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="weightrelay.v1.Worker"), timeout=timeout).status


@pytest.fixture
def seed_model_after(worker):
    yield
    worker.client.initialize("mlp", 0, "mnist", "")


def test_a_train_abandoned_while_it_waits_for_the_model_never_runs(worker, seed_model_after):
    """Cancel, or a deadline, while a slow Evaluate holds the model: no training starts afterwards."""
    worker.client.initialize("mlp:3072,3072,3072", seed=1)
    before = sha(worker)
    blocker = threading.Thread(target=worker.client.evaluate, kwargs={"timeout": 300})
    blocker.start()
    time.sleep(0.5)  # the Evaluate holds the model now
    with pytest.raises(grpc.RpcError) as info:
        worker.client.train_to_end(pb.TrainRequest(epochs=3, max_samples=20000), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = worker.client.train(pb.TrainRequest(epochs=3, max_samples=20000))
    threading.Timer(0.3, stream.cancel).start()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert blocker.is_alive(), "the Evaluate ended too soon for the Trains to have waited"
    blocker.join()
    # Within a second the worker is free, and it never trained (Describe's checksum is empty while training).
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert sha(worker) == before
        time.sleep(0.1)
    assert worker.client.initialize("mlp", 0, "mnist").weights_sha256  # takes a model call at once


def test_a_train_whose_client_leaves_mid_training_frees_the_worker_within_a_second(worker):
    stream = worker.client.train(pb.TrainRequest(epochs=20, batch_size=16, progress_every_batches=5))
    assert next(stream).WhichOneof("event") == "progress"
    stream.cancel()
    wait_until_free(worker, 1.0, "the worker kept training after its client left", poll=0.05)


def test_stalled_streams_leave_health_and_describe_answering(worker):
    """16 SetWeights streams that send one piece and stall: 8 are admitted (they wait), the rest are refused at once."""
    weights = worker.client.get_weights()
    first_piece = next(codec.iter_weight_chunks(weights))
    release = threading.Event()

    def stalled():
        yield first_piece
        release.wait(60)

    calls = [worker.client.stub.SetWeights.future(stalled(), timeout=60) for _ in range(16)]
    try:
        time.sleep(1.0)
        for _ in range(3):
            started = time.monotonic()
            assert health(worker.address, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
            assert worker.client.describe(timeout=1.0).framework == worker.name
            assert time.monotonic() - started < 1.0
        refused = [c for c in calls if c.done()]
        assert len(refused) == 8
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "model calls" in call.details()
    finally:
        for call in calls:
            call.cancel()
        release.set()
    deadline = time.monotonic() + 10
    while True:  # the cancelled streams give their places back
        try:
            worker.client.evaluate()
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)


def test_a_stream_that_stops_sending_is_ended(start_worker):
    quick = start_worker("torch", extra=["--stream-idle-timeout", "1"])
    before = sha(quick)
    weights = quick.client.get_weights()
    pieces = list(codec.iter_weight_chunks({k: v + np.float32(1) for k, v in weights.items()}))

    def stalls():
        yield pieces[0]
        time.sleep(5)
        yield from pieces[1:]

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        quick.client.set_weights_stream(stalls(), timeout=30)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "sent nothing for 1 s" in info.value.details()
    assert time.monotonic() - started < 4
    assert sha(quick) == before


@pytest.mark.parametrize("request_kwargs,text", [
    (dict(learning_rate=1e30), "learning_rate must be a number in (0, 100]"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(learning_rate=float("inf")), "learning_rate"),
    (dict(momentum=1.0), "momentum must be in [0, 1)"),
    (dict(momentum=-0.1), "momentum must be in [0, 1)"),
    (dict(epochs=1001), "epochs 1001 is more than 1000"),
    (dict(batch_size=10**8), "is larger than the"),
    (dict(objective="swap:" + "1," * 50000), "objective"),
])
def test_train_refuses_values_that_wreck_the_model(worker, request_kwargs, text):
    before = sha(worker)
    with pytest.raises(grpc.RpcError) as info:
        list(worker.client.train(pb.TrainRequest(**request_kwargs)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in info.value.details() and len(info.value.details()) <= 1024  # details never echo unbounded input
    assert sha(worker) == before


def test_a_diverging_train_restores_the_weights_it_started_from(worker):
    before = sha(worker)
    with pytest.raises(grpc.RpcError) as info:
        worker.client.train_to_end(pb.TrainRequest(learning_rate=100, momentum=0.99, max_samples=3000, seed=1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training diverged" in info.value.details() and "restored" in info.value.details()
    assert sha(worker) == before
    assert np.isfinite(np.concatenate([w.ravel() for w in worker.client.get_weights().values()])).all()


@pytest.mark.parametrize("seed", [2**32, 42950 * 100_003, 2**64 - 1])
def test_seeds_across_the_whole_uint64_range(worker, seed):
    summary = worker.client.train_to_end(pb.TrainRequest(max_samples=256, seed=seed))
    assert summary.samples_seen == 256


def test_a_tiny_chunk_size_is_raised_to_the_floor(worker):
    chunks = list(worker.client.stub.GetWeights(pb.GetWeightsRequest(max_chunk_bytes=1), timeout=30))
    assert 7 <= len(chunks) <= 16  # 437,544 bytes in pieces of at least 64 KiB, not 437,544 messages
    assert codec.weights_sha256(codec.assemble_weights(chunks)) == sha(worker)


def test_undecodable_requests_get_invalid_argument(worker):
    with grpc.insecure_channel(worker.address) as channel:
        for method in ("Describe", "Initialize", "Train", "Evaluate", "GetWeights"):
            call = channel.unary_unary(f"/weightrelay.v1.Worker/{method}") if method not in ("Train", "GetWeights") \
                else channel.unary_stream(f"/weightrelay.v1.Worker/{method}")
            with pytest.raises(grpc.RpcError) as info:
                result = call(b"\x0f\xff\xff", timeout=10)  # wire type 7: no valid protobuf
                list(result) if method in ("Train", "GetWeights") else result
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "is not a valid weightrelay.v1." in info.value.details()
        set_weights = channel.stream_unary("/weightrelay.v1.Worker/SetWeights")
        with pytest.raises(grpc.RpcError) as info:
            set_weights(iter([b"\x0f\xff\xff"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "message 0 of the stream" in info.value.details()


def test_sigterm_during_train_ends_the_worker_with_exit_0_within_its_grace(start_worker):
    doomed = start_worker("torch", extra=["--grace", "2"])
    stream = doomed.client.train(pb.TrainRequest(epochs=50, batch_size=16, progress_every_batches=10))
    assert next(stream).WhichOneof("event") == "progress"
    process = doomed.process.process
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert process.wait(timeout=15) == 0
    assert time.monotonic() - sent < 2 + 3
    log = doomed.process.log_path.read_text()
    assert "shutting down" in log and "stopped" in log


# -- TLS and the token -------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run([str(REPO / "docker" / "make-certs.sh"), str(directory / "good")], check=True, capture_output=True)
    subprocess.run([str(REPO / "docker" / "make-certs.sh"), str(directory / "other")], check=True, capture_output=True)
    (directory / "token").write_text("s3cret-token\n")
    return directory


@pytest.fixture(scope="module")
def secure_worker(start_worker, certs):
    good = certs / "good"
    return start_worker("torch", extra=["--tls-cert", str(good / "server.crt"), "--tls-key", str(good / "server.key"),
                                        "--tls-client-ca", str(good / "ca.crt"), "--token-file", str(certs / "token")])


def client_security(certs: Path, token: str | None = "s3cret-token", ca: str = "good", client: str = "good") -> ClientSecurity:
    return ClientSecurity(str(certs / ca / "ca.crt"), str(certs / client / "client.crt"), str(certs / client / "client.key"), token)


def test_mutual_tls_and_the_right_token_pass(secure_worker, certs):
    with WorkerClient(secure_worker.address, timeout=30, security=client_security(certs)) as client:
        assert client.describe().framework == "torch"
        assert client.evaluate().samples == 10000


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_no_token_or_a_wrong_one_is_unauthenticated(secure_worker, certs, token):
    with WorkerClient(secure_worker.address, timeout=30, security=client_security(certs, token)) as client:
        for call in (client.describe, client.get_weights, lambda: list(client.train(pb.TrainRequest(epochs=1)))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ("no bearer token" if token is None else "a wrong bearer token") in info.value.details()


def test_health_needs_no_token(secure_worker, certs):
    assert health(secure_worker.address, client_security(certs, token=None), timeout=10) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("ca,client", [("other", "good"), ("good", "other")], ids=["untrusted-server", "untrusted-client"])
def test_an_untrusted_certificate_fails_the_handshake(secure_worker, certs, ca, client):
    with WorkerClient(secure_worker.address, timeout=10, security=client_security(certs, ca=ca, client=client)) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.describe()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_clients_cannot_talk_to_a_tls_worker(secure_worker):
    with grpc.insecure_channel(secure_worker.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.WorkerStub(channel).Describe(pb.DescribeRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_probe_speaks_tls(secure_worker, certs):
    good = certs / "good"
    done = subprocess.run(
        [os.sys.executable, "-m", "weightrelay.healthcheck", secure_worker.address, "--tls-ca", str(good / "ca.crt"),
         "--tls-cert", str(good / "client.crt"), "--tls-key", str(good / "client.key")],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
