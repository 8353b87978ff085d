"""Leases on a real worker (worker.proto, Leases): one run at a time may change it, the others are told who."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.support import wait_until_free
from weightrelay import errors, leases
from weightrelay.client import WorkerClient
from weightrelay.v1 import worker_pb2 as pb

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(start_worker):
    """A worker of this module's own: the leases here never reach other tests' workers."""
    return start_worker("torch")


@pytest.fixture
def clients(worker):
    """(holder, intruder): two clients of the worker; whatever lease is left is broken afterwards."""
    holder, intruder = WorkerClient(worker.address, timeout=60), WorkerClient(worker.address, timeout=60)
    yield holder, intruder
    intruder.release_lease(force=True)
    holder.close()
    intruder.close()


def take(client: WorkerClient, run_id: str = "run-a", seconds: int = 60, seed: int = 0) -> pb.InitializeReply:
    return client.initialize("mlp", seed=seed, lease=pb.LeaseRequest(run_id=run_id, holder="ana@lab run-a", seconds=seconds))


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_held_by_a(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "run 'run-a' (ana@lab run-a)" in error.details() and "coordinator release" in error.details()
    info = errors.error_info(error)
    assert info is not None and info.reason == leases.LEASE_HELD
    assert info.metadata["run_id"] == "run-a" and info.metadata["holder"] == "ana@lab run-a"


def test_a_lease_lets_only_its_holder_change_the_worker(worker, clients):
    holder, intruder = clients
    reply = take(holder)
    assert reply.lease.lease_id and holder.lease_id == reply.lease.lease_id
    shown = intruder.describe().lease
    assert (shown.run_id, shown.holder, shown.lease_id) == ("run-a", "ana@lab run-a", "")  # Describe never shows the id
    assert shown.expires_unix > time.time() + 50
    weights = intruder.get_weights()  # calls that change nothing stay open
    intruder.evaluate()
    for call in (lambda: intruder.initialize("mlp", seed=5),
                 lambda: list(intruder.train(pb.TrainRequest(max_samples=64))),
                 lambda: intruder.set_weights(weights),
                 lambda: intruder.stub.PullWeights(pb.PullWeightsRequest(address=worker.address), timeout=30),
                 lambda: take(intruder, run_id="run-b")):
        assert_held_by_a(refused(call))
    assert intruder.describe().weights_sha256 == reply.weights_sha256  # nothing changed
    holder.train_to_end(pb.TrainRequest(max_samples=256, seed=1))
    holder.set_weights(weights)
    holder.stub.PullWeights(pb.PullWeightsRequest(address=worker.address), timeout=30)
    again = take(holder, seed=3)  # the same run initializes again: its lease, renewed
    assert again.lease.lease_id == reply.lease.lease_id
    assert holder.release_lease().released
    assert not intruder.describe().HasField("lease")
    intruder.initialize("mlp", seed=5)  # free again: a client that knows nothing of leases works as before


def test_an_unrenewed_lease_expires_and_a_renewed_one_does_not(worker, clients):
    holder, intruder = clients
    take(holder, seconds=2)
    for _ in range(4):  # 4 s in all, renewed every second
        time.sleep(1)
        holder.renew_lease()
    assert_held_by_a(refused(lambda: intruder.initialize("mlp")))
    time.sleep(2.5)
    assert not intruder.describe().HasField("lease")
    error = refused(holder.renew_lease)
    assert error.code() == grpc.StatusCode.NOT_FOUND and errors.reason_of(error) == leases.LEASE_UNKNOWN
    take(intruder, run_id="run-b")  # free: another run takes it
    assert intruder.describe().lease.run_id == "run-b"


def test_a_lease_renewed_through_a_long_train_is_kept(worker, clients):
    holder, intruder = clients
    take(holder, seconds=2)
    stream = holder.train(pb.TrainRequest(epochs=50, batch_size=32, progress_every_batches=50))
    started = time.monotonic()
    for event in stream:
        if time.monotonic() - started > 5:  # well past the lease's 2 s
            break
        holder.renew_lease()  # answered while the Train holds the model
    stream.cancel()
    assert intruder.describe().lease.run_id == "run-a"
    wait_until_free(worker, 60, "the worker kept training after the holder cancelled")
    assert_held_by_a(refused(lambda: intruder.initialize("mlp")))


def test_an_operator_breaks_a_stale_lease(worker, clients):
    holder, intruder = clients
    take(holder)
    error = refused(lambda: intruder.stub.ReleaseLease(pb.ReleaseLeaseRequest(lease_id="not-the-id"), timeout=30))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "force" in error.details()
    error = refused(lambda: intruder.stub.ReleaseLease(pb.ReleaseLeaseRequest(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    broken = intruder.release_lease(force=True)
    assert broken.released and broken.lease.run_id == "run-a" and not broken.lease.lease_id
    assert not intruder.release_lease(force=True).released
    # The run whose lease was broken is told so, never silently let on (anyone may have changed the worker).
    error = refused(lambda: list(holder.train(pb.TrainRequest(max_samples=64))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and errors.reason_of(error) == leases.LEASE_LOST
    assert take(holder).lease.lease_id != ""  # taking the worker again (a resumed run) is let through


def test_lease_requests_are_checked(worker, clients):
    holder, _ = clients
    error = refused(lambda: holder.initialize("mlp", lease=pb.LeaseRequest(holder="nobody")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "run_id" in error.details()
    error = refused(lambda: holder.initialize("mlp", lease=pb.LeaseRequest(run_id="x" * 300)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "256" in error.details()
    assert not holder.describe().HasField("lease")
