"""`--local`: start the run's workers as child processes on free ports, and always stop them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from coordinator.config import DEFAULT_WORKERS
from coordinator.errors import CoordinatorError, WorkerStartFailed

#: framework -> module run with `python -m`
WORKER_MODULES = {"torch": "torch_service", "keras": "keras_service", "jax": "jax_service"}


def named_framework(name: str) -> str | None:
    """The framework a worker's name names: its name up to the first "-" ("torch-b" is a second
    torch worker), where that is a framework with a worker; else None."""
    framework = name.split("-", 1)[0]
    return framework if framework in WORKER_MODULES else None


def framework_of(name: str) -> str:
    """The framework of a local worker (see `named_framework`)."""
    framework = named_framework(name)
    if framework is None:
        raise CoordinatorError(f"worker {name!r}: no framework {name.split('-', 1)[0]!r} to start; local workers are named "
                               f"{', '.join(WORKER_MODULES)}, optionally with a suffix (torch-b)")
    return framework


class LocalWorker:
    def __init__(self, name: str, log_dir: Path, extra_args: list[str]):
        self.name = name
        self.ready_file = log_dir / f"{name}-worker.ready.json"
        self.log_path = log_dir / f"{name}-worker.log"
        self.ready_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", WORKER_MODULES[framework_of(name)], "--host", "127.0.0.1", "--port", "0",
                   "--ready-file", str(self.ready_file), *extra_args]
        self._log = open(self.log_path, "w")
        # A session of its own: a Ctrl-C in the terminal reaches the coordinator, which stops
        # the workers in order, instead of killing them mid-call.
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = ""

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                port = json.loads(self.ready_file.read_text())["port"]
                self.address = f"127.0.0.1:{port}"
                return self.address
            if self.process.poll() is not None:
                errors = [line.split(" ERROR ", 1)[1] for line in self.log_tail(50).splitlines() if " ERROR " in line]
                cause = errors[-1] if errors else f"it exited with code {self.process.returncode}"
                raise WorkerStartFailed(f"the local {self.name} worker could not start: {cause} (log: {self.log_path})")
            time.sleep(0.1)
        raise CoordinatorError(f"the local {self.name} worker was not ready in time; see {self.log_path}")

    def stop(self, grace: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.ready_file.unlink(missing_ok=True)


class LocalWorkers:
    """Context manager: {name: address} of freshly started workers (default: the default workers)."""

    def __init__(self, log_dir: Path, seed: int, data_dir: str | None, dataset: str = "mnist", model: str = "mlp",
                 startup_timeout: float = 300.0, names: tuple[str, ...] | None = None):
        self.names = names or tuple(d.name for d in DEFAULT_WORKERS)
        self.log_dir = log_dir
        self.seed = seed
        self.data_dir = data_dir
        self.dataset = dataset
        self.model = model
        self.startup_timeout = startup_timeout
        self.workers: list[LocalWorker] = []

    def __enter__(self) -> dict[str, str]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        args = ["--seed", str(self.seed), "--dataset", self.dataset, "--model", self.model]
        if self.data_dir:
            args += ["--data-dir", str(self.data_dir)]
        try:
            for name in self.names:
                self.workers.append(LocalWorker(name, self.log_dir, args))
            deadline = time.monotonic() + self.startup_timeout
            return {worker.name: worker.wait_ready(deadline) for worker in self.workers}
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def __exit__(self, *exc) -> None:
        self.stop()
