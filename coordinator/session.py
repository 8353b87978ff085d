"""The workers of one run and how the coordinator speaks to them, for the relay and twin training alike.

A `Session` connects to named workers, gives them all the same clean start (Initialize), refuses
workers that cannot share weights, runs every call under the run's deadlines with failures that
name the worker, the round and the step, and records how the run ended whatever happens.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import grpc

from coordinator import compatibility, moves
from coordinator.config import RunConfig
from coordinator.errors import (CoordinatorError, IncompatibleWorkers, RoundFailed, SettingsRefused, UsageError,
                                WorkerLeased, WorkerUnreachable)
from coordinator.lease_keeper import LeaseKeeper
from coordinator.records import Results, RunInfo, WorkerInfo, now, to_json, write_results
from coordinator.results import RESULTS_FILE
from weightrelay import codec, errors, leases, models
from weightrelay.client import WorkerClient
from weightrelay.security import ClientSecurity, SecurityError, resolve_token
from weightrelay.v1 import worker_pb2 as pb

#: on_event(kind, payload): "start", "step", "train_progress", "train_done", "evaluation", "transfer",
#: "checkpoint", "round_done", "done"
EventSink = Callable[[str, dict[str, Any]], None]
#: How long Initialize waits for a worker still ending a Train (see Session._when_not_training).
INITIALIZE_WAIT = 60.0
T = TypeVar("T")


@dataclass
class Worker:
    name: str
    client: WorkerClient
    objective: str
    describe: pb.DescribeReply | None = None


def _where(round_index: int | None) -> str:
    return f"round {round_index}, " if round_index is not None else "before round 0, "


class Session:
    """The run's workers are its own until it ends: Initialize takes each worker's lease (see
    coordinator.lease_keeper), every later call carries it, and the end of the run releases it."""

    def __init__(self, config: RunConfig, run_dir: Path, on_event: EventSink):
        self.config = config
        self.run_dir = run_dir
        self.on_event = on_event
        self.workers: dict[str, Worker] = {}
        self.leases = LeaseKeeper(run_dir, config.lease_seconds)

    # -- calls -----------------------------------------------------------------------------
    def call(self, worker: Worker, what: str, round_index: int | None, fn: Callable[[], T], settings: bool = False) -> T:
        """Run one RPC, turning gRPC failures into errors that name the worker, the round and the step.
        With `settings` (Initialize, Train), a refusal of the request's settings is a usage error."""
        step = f"{_where(round_index)}{what}"
        try:
            return fn()
        except moves.SenderFailed as failed:  # a forwarded move whose sender's stream broke: name the sender
            sender = next((w for w in self.workers.values() if w.client is failed.sender), worker)
            raise self._failure(sender, step, failed.error, settings) from None
        except grpc.RpcError as exc:
            raise self._failure(worker, step, exc, settings) from None
        except codec.TensorError as exc:
            raise RoundFailed(f"{step} on the {worker.name} worker at {worker.client.address}: bad weights stream: {exc}") from None

    @staticmethod
    def _failure(worker: Worker, step: str, exc: grpc.RpcError, settings: bool) -> CoordinatorError:
        code, details = exc.code(), exc.details()
        where = f"the {worker.name} worker at {worker.client.address}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return WorkerUnreachable(worker.name, worker.client.address, f"{step}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RoundFailed(f"{step}: {where} did not finish within its deadline "
                               "(DEADLINE_EXCEEDED); is it stopped or overloaded? (--call-timeout, --train-timeout)")
        if code == grpc.StatusCode.FAILED_PRECONDITION and errors.reason_of(exc) == leases.LEASE_HELD:
            return WorkerLeased(f"{step}: {where} is not this run's: {details}")
        if settings and code == grpc.StatusCode.INVALID_ARGUMENT:
            return SettingsRefused(f"{step}: {where} refuses the run's settings: {details}")
        return RoundFailed(f"{step} on {where} failed: {code.name}: {details}")

    def _security(self) -> ClientSecurity:
        c = self.config
        try:
            return ClientSecurity(c.tls_ca, c.tls_cert, c.tls_key, resolve_token(c.token_file), c.tls_server_name)
        except SecurityError as exc:
            raise UsageError(str(exc)) from None

    # -- the start every run makes --------------------------------------------------------
    def connect(self, addresses: dict[str, str], objective_of: Callable[[str], str]) -> None:
        """A channel to each worker, ready within --connect-timeout, and its Describe."""
        for name, address in addresses.items():
            try:
                client = WorkerClient(address, timeout=self.config.call_timeout, security=self._security())
            except SecurityError as exc:
                raise UsageError(str(exc)) from None
            try:
                client.wait_ready(self.config.connect_timeout)
            except grpc.FutureTimeoutError:
                client.close()
                raise WorkerUnreachable(name, address, f"no connection within {self.config.connect_timeout:g} s") from None
            worker = Worker(name, client, objective_of(name))
            self.workers[name] = worker
            worker.describe = self.call(worker, "Describe", None, client.describe)

    def initialize(self, resumed: bool = False) -> None:
        """A clean start: every worker builds the run's model with fresh weights from --seed on the run's data set
        and its objective, whatever it held before, so a run against long-lived workers repeats exactly; and
        each worker's lease is taken for this run (`resumed`: taken back with the ids the run kept)."""
        spec = models.to_proto(models.load_model(self.config.model))
        lease = self.leases.request()
        if resumed:
            self.leases.resume({name: worker.client for name, worker in self.workers.items()})
        for worker in self.workers.values():
            self.call(worker, "Initialize", None, lambda w=worker: self._when_not_training(
                lambda: w.client.initialize(spec, self.config.seed, self.config.dataset, w.objective, lease=lease)), settings=True)
            self.leases.took(worker.name, worker.client)
            worker.describe = self.call(worker, "Describe", None, worker.client.describe)
        self.leases.start()

    def _when_not_training(self, call: Callable[[], T]) -> T:
        """`call`, again while the worker answers WORKER_TRAINING, for up to INITIALIZE_WAIT seconds: a run
        resumed right after its coordinator was killed finds its workers ending the Train it left, which
        stops at the Train's next batch."""
        deadline = time.monotonic() + min(INITIALIZE_WAIT, self.config.call_timeout)
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if errors.reason_of(exc) != errors.WORKER_TRAINING or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def check_compatible(self) -> None:
        """Refuse workers whose parameters or data differ, or that are not what their names say."""
        problems = compatibility.problems({name: w.describe for name, w in self.workers.items()},
                                          {name: w.client.address for name, w in self.workers.items()})
        if problems:
            raise IncompatibleWorkers("; ".join(problems))

    def start(self, run: RunInfo) -> None:
        """Connected and initialized: record the workers in `run` (also when they turn out incompatible),
        check them, and announce the start."""
        run.workers = {name: WorkerInfo(w.client.address, w.describe) for name, w in self.workers.items()}
        run.objectives = {name: w.objective for name, w in self.workers.items()}
        self.check_compatible()
        self.on_event("start", {"run_dir": str(self.run_dir), "config": run.config, "workers": to_json(run.workers)})

    def train_request(self, worker: Worker, seed: int, **schedule: Any) -> pb.TrainRequest:
        """A Train of the run's hyperparameters and `worker`'s objective (`schedule`: the request's other fields)."""
        c = self.config
        return pb.TrainRequest(epochs=c.epochs, batch_size=c.batch_size, learning_rate=c.lr, momentum=c.momentum, seed=seed,
                               objective=worker.objective, max_samples=c.max_train_samples, **schedule)

    # -- the record ---------------------------------------------------------------------------
    def save(self, results: Results) -> None:
        write_results(self.run_dir, results)

    @contextmanager
    def recorded(self, results: Results, kept: Callable[[], int] | None = None) -> Iterator[None]:
        """Around a whole run: its final status in results.json whatever happens (complete, interrupted,
        failed with the error and, where `kept` counts rounds that can be resumed from, how), and the
        channels closed."""
        run = results.run
        try:
            yield
            run.status = "complete"
        except KeyboardInterrupt:
            run.status = "interrupted"
            raise
        except CoordinatorError as exc:
            run.status = "failed"
            done = kept() if kept is not None else 0
            if kept is not None and (done or not isinstance(exc, (UsageError, IncompatibleWorkers))):
                what = f"rounds 0-{done - 1} are kept" if done else "no round finished"
                exc.args = (f"{exc}; {what}: continue with `coordinator run --resume {self.run_dir}`",)
            run.error = str(exc)
            raise
        finally:
            run.finished_at = now()
            self.save(results)
            self.close()
        self.on_event("done", {"run_dir": str(self.run_dir), "results": str(self.run_dir / RESULTS_FILE)})

    def close(self) -> None:
        """Release the run's leases and close the channels."""
        self.leases.release()
        for worker in self.workers.values():
            worker.client.close()
