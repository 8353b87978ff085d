"""Shared fixtures. Test processes never import torch or TensorFlow: workers run as subprocesses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from coordinator.local import LocalWorker
from weightrelay.client import WorkerClient
from tests.support import REPO
from weightrelay.data import default_data_dir



@pytest.fixture(scope="session")
def data_dir() -> Path:
    """$WEIGHTRELAY_DATA_DIR, else ../shared/data/mnist beside the checkout, else the default cache
    (where the workers download MNIST when it is missing)."""
    if os.environ.get("WEIGHTRELAY_DATA_DIR"):
        return Path(os.environ["WEIGHTRELAY_DATA_DIR"])
    shared = REPO.parent / "shared" / "data" / "mnist"
    return shared if shared.is_dir() else default_data_dir()


@pytest.fixture(scope="session", autouse=True)
def data_dir_for_subprocesses(data_dir):
    """Coordinators, sweeps and Ray nodes that the tests start find MNIST where the tests do (as under
    .ci/run, which exports it), never in the download cache of a machine without a network."""
    previous = os.environ.get("WEIGHTRELAY_DATA_DIR")
    os.environ["WEIGHTRELAY_DATA_DIR"] = str(data_dir)
    yield
    if previous is None:
        del os.environ["WEIGHTRELAY_DATA_DIR"]


class RunningWorker:
    def __init__(self, name: str, log_dir: Path, data_dir: Path, extra: list[str] | None = None):
        self.process = LocalWorker(name, log_dir, ["--data-dir", str(data_dir), *(extra or [])])
        self.name = name
        try:
            self.address = self.process.wait_ready(time.monotonic() + 300)
        except BaseException:
            self.process.stop()
            raise
        self.client = WorkerClient(self.address, timeout=120)

    def stop(self) -> None:
        self.client.close()
        self.process.stop()


@pytest.fixture(scope="session")
def start_worker(tmp_path_factory, data_dir):
    """start_worker(name, data_dir=None, extra=None) -> RunningWorker, stopped at session end."""
    started: list[RunningWorker] = []

    def start(name: str, data: Path | None = None, extra: list[str] | None = None) -> RunningWorker:
        worker = RunningWorker(name, tmp_path_factory.mktemp(f"{name}-worker"), data or data_dir, extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def torch_worker(start_worker) -> RunningWorker:
    return start_worker("torch")


@pytest.fixture(scope="session")
def keras_worker(start_worker) -> RunningWorker:
    return start_worker("keras")


@pytest.fixture(scope="session")
def jax_worker(start_worker) -> RunningWorker:
    return start_worker("jax")


@pytest.fixture(params=["torch", "keras", "jax"])
def worker(request) -> RunningWorker:
    """Each framework's worker in turn (started once per session)."""
    return request.getfixturevalue(f"{request.param}_worker")
