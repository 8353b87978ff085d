"""Runs against long-lived workers hold them through leases: an intrusion is refused with the run named,
never turned into a silently different result; a vanished coordinator's workers free themselves; a resumed
run takes its workers back at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from coordinator.results import load_results
from tests.e2e.runner import coordinator, results_path
from weightrelay import errors, leases
from weightrelay.client import WorkerClient
from weightrelay.v1 import worker_pb2 as pb

pytestmark = pytest.mark.e2e

SETTINGS = ["--max-train-samples", "3000", "--epochs", "2", "--seed", "4", "--no-report"]


def checksums(results: dict) -> list[str]:
    """Every weights checksum a run recorded, in order: evaluations, trainings, the kept checkpoint."""
    found = [e["weights_sha256"] for e in results["initial_sync"]["evaluations"]]
    for round_ in results["rounds"]:
        found += [e["weights_sha256"] for e in round_["evaluations"]]
        found += [round_["train"][name]["weights_sha256"] for name in sorted(round_["train"])]
    return found + sorted(results["checkpoint"]["sha256"].values())


@pytest.fixture(scope="module")
def workers(start_worker, data_dir):
    """Long-lived torch and keras workers of this module's own."""
    return start_worker("torch"), start_worker("keras")


def wait_for_lease(client: WorkerClient, within: float = 120) -> pb.Lease:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        described = client.describe()
        if described.HasField("lease"):
            return described.lease
        time.sleep(0.05)
    raise AssertionError("the run took no lease")


class Intruder(threading.Thread):
    """Another client trying every call that changes a worker, in a loop, until told to stop."""

    def __init__(self, torch: WorkerClient, keras: WorkerClient):
        super().__init__(daemon=True)
        self.torch, self.keras = torch, keras
        self.stop = threading.Event()
        self.refusals: list[grpc.RpcError] = []
        self.accepted: list[str] = []
        self.weights: dict = {}  # a set for SetWeights: GetWeights is open to everyone

    def attempts(self):
        weights = self.weights
        yield "Initialize", lambda: self.torch.initialize("mlp", seed=99)
        yield "Train", lambda: self.keras.train_to_end(pb.TrainRequest(max_samples=64, seed=99))
        yield "SetWeights", lambda: self.keras.set_weights(weights)
        yield "PullWeights", lambda: self.torch.stub.PullWeights(pb.PullWeightsRequest(address=self.keras.address), timeout=60)

    def run(self) -> None:
        while not self.stop.is_set():
            for name, call in self.attempts():
                try:
                    call()
                    self.accepted.append(name)
                except grpc.RpcError as exc:
                    self.refusals.append(exc)


def test_a_run_holds_its_workers_against_every_intrusion(workers, data_dir, tmp_path):
    torch, keras = workers
    addresses = ["--torch", torch.address, "--keras", keras.address]
    run = subprocess.Popen([sys.executable, "-m", "coordinator", "run", *addresses, "--rounds", "6", "--lease-seconds", "6",
                            *SETTINGS, "--out", str(tmp_path / "a")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    intruder = Intruder(WorkerClient(torch.address, timeout=60), WorkerClient(keras.address, timeout=60))
    try:
        intruder.weights = intruder.keras.get_weights()
        lease = wait_for_lease(intruder.torch)
        assert lease.run_id and not lease.lease_id and str(tmp_path / "a") in lease.holder
        intruder.start()
        second = coordinator("run", *addresses, "--rounds", "1", *SETTINGS, "--out", str(tmp_path / "b"))
        assert second.returncode == 3, second.stderr  # at once, naming the holder
        assert f"run {lease.run_id!r} ({lease.holder})" in second.stderr and "coordinator release" in second.stderr
        stdout, stderr = run.communicate(timeout=600)
    finally:
        intruder.stop.set()
        if run.poll() is None:
            run.kill()
    intruder.join(timeout=120)
    assert run.returncode == 0, stderr
    assert not intruder.accepted or not intruder.torch.describe().HasField("lease")  # only after the run let go
    refused_while_held = [e for e in intruder.refusals if errors.reason_of(e) == leases.LEASE_HELD]
    assert len(refused_while_held) >= 4 and all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in refused_while_held)
    assert all(f"run {lease.run_id!r}" in e.details() for e in refused_while_held)
    assert {e.details().split(":")[0] for e in refused_while_held} >= {"Initialize", "Train", "SetWeights", "PullWeights"}
    held = load_results(results_path(stdout).parent)
    assert held["status"] == "complete" and len(held["rounds"]) == 6
    alone = coordinator("run", "--local", "--data-dir", str(data_dir), "--rounds", "6", *SETTINGS, "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    assert checksums(held) == checksums(load_results(results_path(alone.stdout).parent))
    assert not intruder.torch.describe().HasField("lease") and not intruder.keras.describe().HasField("lease")  # released at the end


def kill_after_first_round(args: list[str], out: Path) -> Path:
    """Start a run, SIGKILL its coordinator once round 0 is kept; its run directory."""
    run = subprocess.Popen([sys.executable, "-m", "coordinator", "run", *args, "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = [p for p in out.glob("*/results.json") if load_results(p).get("rounds")]
            if found:
                os.kill(run.pid, signal.SIGKILL)
                run.wait(timeout=30)
                return found[0].parent
            assert run.poll() is None, run.stdout.read()
            time.sleep(0.1)
        raise AssertionError("round 0 was not kept in time")
    finally:
        if run.poll() is None:
            run.kill()


def test_a_killed_coordinators_workers_free_themselves_and_resume_takes_them_back_at_once(workers, tmp_path):
    torch, keras = workers
    args = ["--torch", torch.address, "--keras", keras.address, "--rounds", "40", "--lease-seconds", "6", *SETTINGS]
    watcher = WorkerClient(torch.address, timeout=60)
    run_dir = kill_after_first_round(args, tmp_path / "a")
    held = watcher.describe().lease
    assert held.run_id == run_dir.name  # the killed run's lease is still held ...
    done = coordinator("run", "--resume", str(run_dir), "--rounds", "2")  # ... and the run takes it back at once
    assert done.returncode == 0, done.stderr
    resumed = load_results(run_dir)
    assert resumed["status"] == "complete" and len(resumed["rounds"]) == 2
    assert not watcher.describe().HasField("lease")

    run_dir = kill_after_first_round(args, tmp_path / "b")
    killed_at = time.monotonic()
    assert watcher.describe().lease.run_id == run_dir.name
    while watcher.describe().HasField("lease"):  # nobody renews it: it expires within its 6 s
        assert time.monotonic() - killed_at < 6 + 3, "the lease of a killed coordinator did not expire"
        time.sleep(0.1)
    watcher.initialize("mlp")  # free: a client that knows nothing of leases works as before
    done = coordinator("run", "--resume", str(run_dir), "--rounds", "2")  # free again: the run takes a new lease
    assert done.returncode == 0, done.stderr
