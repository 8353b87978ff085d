"""The container tier: build the images, `compose up`, and use the workers as users do.

Needs a Docker engine and Compose (v2's `docker compose` or docker-compose 1.29). Build knobs for
machines that cannot pull images come from the environment (see docker/prepare-local-build.sh).
Run with `make test-containers`; `.ci/run` runs it after the fast suite.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.results import load_results
from tests.e2e.runner import results_path
from tests.support import REPO, ctrl_c_reaches_it, free_port
from tests.relay_checks import assert_objectives_carried, assert_results_shape
from weightrelay.client import WorkerClient
from weightrelay.data import load_mnist

pytestmark = pytest.mark.containers
HEALTH_TIMEOUT = 300


def compose_command() -> list[str]:
    """$WEIGHTRELAY_COMPOSE, else Compose v2 when the docker CLI has it, else docker-compose."""
    if os.environ.get("WEIGHTRELAY_COMPOSE"):
        return shlex.split(os.environ["WEIGHTRELAY_COMPOSE"])
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no Compose: install Docker Compose v2 or Debian's docker-compose")


class Stack:
    """One compose project of this repository, on free host ports."""

    def __init__(self, data_dir: Path):
        self.project = f"weightrelay-test-{os.getpid()}"
        self.ports = {"torch": free_port(), "keras": free_port(), "jax": free_port()}
        self.env = {
            **os.environ,
            "WEIGHTRELAY_DATA_DIR": str(data_dir.resolve()),
            "WEIGHTRELAY_TORCH_PORT": str(self.ports["torch"]),
            "WEIGHTRELAY_KERAS_PORT": str(self.ports["keras"]),
            "WEIGHTRELAY_JAX_PORT": str(self.ports["jax"]),
            "WEIGHTRELAY_UID": str(os.getuid()),
            "WEIGHTRELAY_GID": str(os.getgid()),
        }
        self.base = compose_command() + ["-p", self.project, "-f", str(REPO / "docker-compose.yml")]

    def address(self, worker: str) -> str:
        return f"127.0.0.1:{self.ports[worker]}"

    def compose(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        done = subprocess.run(self.base + list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        out = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", self.container(service)],
                             capture_output=True, text=True)
        return out.stdout.strip()

    def wait_healthy(self, services: tuple[str, ...]) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while True:
            states = {service: self.health(service) for service in services}
            if all(state == "running healthy" for state in states.values()):
                return
            if time.monotonic() > deadline or any(s.startswith(("exited", "dead")) for s in states.values()):
                logs = self.compose("logs", "--tail", "30", *services, check=False).stdout
                raise AssertionError(f"workers not healthy: {states}\n{logs}")
            time.sleep(2)

    def exec(self, service: str, *command: str) -> str:
        return subprocess.run(["docker", "exec", self.container(service), *command], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def stack(data_dir):
    stack = Stack(data_dir)
    stack.compose("build")
    try:
        stack.compose("up", "-d")
        stack.wait_healthy(("torch-worker", "keras-worker", "jax-worker"))
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)


def test_mnist_is_fetched_once_and_the_workers_read_it(stack, data_dir):
    fetch_logs = stack.compose("logs", "mnist-data").stdout
    assert fetch_logs.count("fingerprint") == 1
    fingerprint = load_mnist(data_dir, download=False).fingerprint
    for worker in ("torch", "keras", "jax"):
        with WorkerClient(stack.address(worker), timeout=60) as client:
            reply = client.describe()
        assert reply.framework == worker and reply.device.startswith("cpu")
        assert reply.dataset.data_dir == "/data" and reply.dataset.fingerprint == fingerprint


def test_workers_run_as_non_root_with_only_their_framework(stack):
    probe = "import importlib.util as u; print(*(u.find_spec(m) is not None for m in ('torch', 'tensorflow', 'jax')))"
    for service in ("torch-worker", "keras-worker", "jax-worker"):
        assert stack.exec(service, "id", "-u") == "10001"
    assert stack.exec("torch-worker", "python", "-c", probe) == "True False False"
    assert stack.exec("keras-worker", "python", "-c", probe) == "False True False"
    assert stack.exec("jax-worker", "python", "-c", probe) == "False False True"


def test_evaluate_directly_on_each_container(stack):
    for worker in ("torch", "keras"):
        with WorkerClient(stack.address(worker), timeout=120) as client:
            reply = client.evaluate(include_predictions=True)
        assert sum(sum(row.counts) for row in reply.confusion_matrix) == 10000
        assert len(reply.predictions) == 10000


def test_coordinator_on_the_host_relays_between_the_containers(stack, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", "run", "--rounds", "2", "--torch", stack.address("torch"),
         "--keras", stack.address("keras"), "--out", str(tmp_path), "--no-report"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr
    results = load_results(results_path(done.stdout).parent)
    assert_results_shape(results, rounds=2)
    assert_objectives_carried(results)
    assert {w["dataset"]["data_dir"] for w in results["workers"].values()} == {"/data"}


def test_two_runs_against_the_long_lived_containers_are_identical(stack, tmp_path):
    """The second run starts where the first left the workers; Initialize makes it start clean again."""
    def run() -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "coordinator", "run", "--rounds", "2", "--max-train-samples", "6000", "--torch", stack.address("torch"),
             "--keras", stack.address("keras"), "--out", str(tmp_path), "--no-report", "--quiet"],
            capture_output=True, text=True, timeout=900,
        )
        assert done.returncode == 0, done.stderr
        return load_results(results_path(done.stdout).parent)

    first, second = run(), run()
    checksums = [[e["weights_sha256"] for r in results["rounds"] for e in r["evaluations"]] for results in (first, second)]
    assert len(checksums[0]) == 8 and checksums[0] == checksums[1]
    assert [e["weights_sha256"] for e in first["initial_sync"]["evaluations"]] == [e["weights_sha256"] for e in second["initial_sync"]["evaluations"]]
    assert [[e["confusion_matrix"] for e in r["evaluations"]] for r in first["rounds"]] == \
        [[e["confusion_matrix"] for e in r["evaluations"]] for r in second["rounds"]]


def test_a_three_worker_relay_between_the_containers(stack, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", "run", "--rounds", "1", "--max-train-samples", "6000", "--lr", "0.05",
         *(f"--worker={w}={stack.address(w)}" for w in ("torch", "keras", "jax")), "--objective", "jax=swap:3,8",
         "--out", str(tmp_path), "--no-report", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr
    results = load_results(results_path(done.stdout).parent)
    assert results["order"] == ["torch", "keras", "jax"] and results["status"] == "complete"
    [item] = results["rounds"]
    assert [(m["from"], m["to"]) for m in item["moves"]] == [("torch", "keras"), ("keras", "jax"), ("jax", "torch")]
    assert all(m["differing_predictions"] == 0 and m["max_abs_probability_diff"] <= 1e-5 for m in item["moves"])
    by_phase = {e["phase"]: e for e in item["evaluations"]}
    assert by_phase["torch_trained"]["swap_rates"]["1<->7"] > 0.8 and by_phase["jax_trained"]["swap_rates"]["3<->8"] > 0.5
    assert {w["framework"] for w in results["workers"].values()} == {"torch", "keras", "jax"}


def test_compose_run_coordinator_writes_runs_on_the_host(stack):
    out = f"runs/container-test-{os.getpid()}"
    try:
        done = stack.compose("run", "--rm", "coordinator", "run", "--rounds", "1", "--max-train-samples", "3000", "--out", out, "--quiet")
        run_dir = REPO / out / results_path(done.stdout).parent.name  # printed as the container sees it
        results = load_results(run_dir)
        assert results["status"] == "complete" and len(results["rounds"]) == 1
        assert results["config"]["torch"] == "torch-worker:50051"  # from the compose file's environment
        assert (run_dir / "report.html").is_file()
    finally:
        shutil.rmtree(REPO / out, ignore_errors=True)


def test_a_stopped_worker_container_is_named_by_the_coordinator(stack, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "run", "--rounds", "20", "--torch", stack.address("torch"),
         "--keras", stack.address("keras"), "--out", str(tmp_path), "--connect-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_it,
    )
    try:
        for line in process.stdout:
            if "torch trained" in line:
                break
        stack.compose("stop", "keras-worker")
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(60)
    assert process.returncode in (3, 5), stderr
    assert "keras worker" in stderr and stack.address("keras") in stderr
    assert load_results(next(tmp_path.iterdir()))["status"] == "failed"
