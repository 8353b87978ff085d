"""`coordinator sweep --ray ADDRESS`: each run's workers as Ray actors, one worker process per actor.

An actor asks the cluster for the resources the sweep file gives its framework (`[resources]`,
one CPU by default), is placed with the SPREAD strategy, starts `python -m <fw>_service` on its
node bound to the node's address, and reports that address; the coordinators stay in the sweep's
process and speak gRPC to the workers as to any others. The worker process dies with its actor
(Linux's parent-death signal), so a lost node or a killed actor ends its workers, the run's calls
fail, and the sweep starts the run again on new actors.

Ray is an optional extra (`pip install 'weightrelay[ray]'`): only this module imports it, and
only `--ray` imports this module. The nodes need weightrelay with the frameworks they serve.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from coordinator.config import RunConfig
from coordinator.errors import UsageError, WorkerStartFailed
from coordinator.local import WORKER_MODULES, framework_of

import ray  # a ModuleNotFoundError here: the command says which extra to install

#: Seconds an actor waits for its worker to serve, and the sweep for an actor to report.
STARTUP_TIMEOUT = 300.0
#: Ray's address that starts a one-node cluster in this process, bound to the loopback address.
LOCAL = "local"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the worker process before it runs: SIGKILL when the actor that started it exits."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerActor:
    """One worker process on a Ray node (made a Ray actor class by `_actor_class`)."""

    def __init__(self, module: str, args: list[str], host: str = ""):
        self.directory = Path(tempfile.mkdtemp(prefix="weightrelay-actor-"))
        ready = self.directory / "ready.json"
        self.log_path = self.directory / "worker.log"
        host = host or ray.util.get_node_ip_address()  # a loopback cluster's workers stay on loopback
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", module, "--host", host, "--port", "0", "--ready-file", str(ready), *args],
                                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        self.address = ""
        while time.monotonic() < deadline and self.process.poll() is None:
            if ready.exists():
                self.address = f"{host}:{json.loads(ready.read_text())['port']}"
                break
            time.sleep(0.1)

    def describe(self) -> dict[str, Any]:
        """Where the worker serves (empty when it could not start: then the tail of its log says why)."""
        tail = "" if self.address else "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return {"address": self.address, "node": ray.get_runtime_context().get_node_id(), "log_tail": tail}

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(max_restarts=0)(WorkerActor)
    return _ACTOR


def connect(address: str) -> TextIO:
    """Join the cluster at `address` ("local": start one on 127.0.0.1 for this process). From then on
    sys.stdout is stderr: the caller keeps the real stdout (returned) for its own output."""
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address == LOCAL:
        options.update(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        options.update(address=address)
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--ray {address}: cannot join the Ray cluster: {exc}") from None
    # Ray prints the cluster's errors (a node lost) on sys.stdout: stdout is the sweep's (its --json events).
    stdout, sys.stdout = sys.stdout, sys.stderr
    return stdout


class RaySet:
    """The workers of one run as actors (see the module's docstring)."""

    def __init__(self, names: tuple[str, ...], config: RunConfig, resources: dict[str, dict[str, Any]], host: str = ""):
        args = ["--dataset", config.dataset, "--model", config.model, "--seed", str(config.seed)]
        if config.data_dir:
            args += ["--data-dir", str(config.data_dir)]
        self.actors: dict[str, Any] = {}
        for name in names:
            framework = framework_of(name)
            asked = {"num_cpus": 1, **resources.get(framework, {})}
            self.actors[name] = _actor_class().options(scheduling_strategy="SPREAD", **asked).remote(WORKER_MODULES[framework], args, host)
        self.addresses: dict[str, str] = {}
        self.nodes: dict[str, str] = {}
        try:
            for name, actor in self.actors.items():
                info = ray.get(actor.describe.remote(), timeout=STARTUP_TIMEOUT)
                if not info["address"]:
                    raise WorkerStartFailed(f"the {name} worker of a Ray actor on node {info['node']} could not start: {info['log_tail']}")
                self.addresses[name], self.nodes[name] = info["address"], info["node"]
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise WorkerStartFailed(f"Ray placed no actor for the workers {', '.join(names)} within {STARTUP_TIMEOUT:g} s; "
                                    f"does the cluster have the resources the sweep file asks ({resources or 'one CPU each'})?") from None
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        try:
            return all(ray.get([actor.alive.remote() for actor in self.actors.values()], timeout=30))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return False

    def stop(self) -> None:
        for actor in self.actors.values():
            try:
                ray.get(actor.stop.remote(), timeout=30)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass
            try:
                ray.kill(actor)
            except ray.exceptions.RayError:
                pass
        self.actors = {}


class RayPlacer:
    def __init__(self, address: str, resources: dict[str, dict[str, Any]]):
        self.stdout = connect(address)
        self.resources = resources
        #: where the workers listen: 127.0.0.1 on a cluster on loopback (every node is this machine), else each node's address
        self.host = "127.0.0.1" if address == LOCAL or address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost") else ""

    def start(self, names: tuple[str, ...], config: RunConfig, log_dir: Path) -> RaySet:
        return RaySet(names, config, self.resources, self.host)

    def close(self) -> None:
        ray.shutdown()
        sys.stdout = self.stdout

