"""The experiment: relay one set of weights around a ring of named workers for N rounds.

Each round, for each worker W of the ring in turn, with N the next one (the last hands back
to the first): W trains -> the weights move from W to N -> W and N evaluate them at the same
time (`W_trained`, `N_from_W`). With the default ring torch, keras that is torch_trained, keras_from_torch,
keras_trained, torch_from_keras. At each move the receiver's predictions are compared with the
sender's on the whole test set. The coordinator speaks of named workers only; which framework
each one runs is what its Describe says.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np

import weightrelay
from coordinator import checkpoint, moves
from coordinator.config import RunConfig
from coordinator.local import WORKER_MODULES
from coordinator.errors import CoordinatorError, IncompatibleWorkers, RoundFailed, UsageError, WorkerUnreachable
from coordinator.results import RESULTS_FILE, SCHEMA_VERSION, evaluation_record, message_to_dict, swap_pairs
from weightrelay import codec, models
from weightrelay.client import WorkerClient
from weightrelay.files import write_json_atomic
from weightrelay.security import ClientSecurity, SecurityError, resolve_token
from weightrelay.v1 import worker_pb2 as pb

#: on_event(kind, payload): "start", "step", "train_progress", "train_done", "evaluation", "transfer", "round_done", "done"
EventSink = Callable[[str, dict[str, Any]], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Worker:
    name: str
    client: WorkerClient
    objective: str
    describe: pb.DescribeReply | None = None


@dataclass
class Relay:
    config: RunConfig
    run_dir: Path
    on_event: EventSink
    workers: dict[str, Worker] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    pairs: list[tuple[int, int]] = field(default_factory=lambda: [(1, 7)])
    _beside: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="evaluate"))

    # -- plumbing ------------------------------------------------------------------------
    def _call(self, worker: Worker, what: str, round_index: int | None, fn: Callable[[], Any]) -> Any:
        """Run one RPC, turning gRPC failures into errors that name the worker, the round and the step."""
        where = f"round {round_index}, " if round_index is not None else "before round 0, "
        try:
            return fn()
        except moves.SenderFailed as failed:  # a forwarded move whose sender's stream broke: name the sender
            sender = next((w for w in self.workers.values() if w.client is failed.sender), worker)
            raise self._failure(sender, f"{where}{what}", failed.error) from None
        except grpc.RpcError as exc:
            raise self._failure(worker, f"{where}{what}", exc) from None
        except codec.TensorError as exc:
            raise RoundFailed(f"{where}{what} on the {worker.name} worker at {worker.client.address}: bad weights stream: {exc}") from None

    @staticmethod
    def _failure(worker: Worker, step: str, exc: grpc.RpcError) -> CoordinatorError:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            return WorkerUnreachable(worker.name, worker.client.address, f"{step}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RoundFailed(f"{step}: the {worker.name} worker at {worker.client.address} did not finish within its deadline "
                               "(DEADLINE_EXCEEDED); is it stopped or overloaded? (--call-timeout, --train-timeout)")
        return RoundFailed(f"{step} on the {worker.name} worker at {worker.client.address} failed: {code.name}: {details}")

    def _security(self) -> ClientSecurity:
        c = self.config
        try:
            return ClientSecurity(c.tls_ca, c.tls_cert, c.tls_key, resolve_token(c.token_file), c.tls_server_name)
        except SecurityError as exc:
            raise UsageError(str(exc)) from None

    def _save(self) -> None:
        write_json_atomic(self.run_dir / RESULTS_FILE, self.results, indent=1)

    # -- steps ---------------------------------------------------------------------------
    def connect(self, addresses: dict[str, str]) -> None:
        unknown = [entry.split("=", 1)[0] for entry in self.config.objective if entry.split("=", 1)[0] not in addresses]
        if unknown:
            raise UsageError(f"--objective names {', '.join(unknown)}, which is no worker of this run ({', '.join(addresses)})")
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
            worker = Worker(name, client, self.config.objective_for(name))
            worker.describe = self._call(worker, "Describe", None, client.describe)
            self.workers[name] = worker

    def initialize(self) -> None:
        """A clean start: both workers build the run's model with fresh weights from --seed on the run's data set
        and the run's objectives, whatever they held before, so a run against long-lived workers repeats exactly."""
        spec = models.to_proto(models.load_model(self.config.model))
        for worker in self.workers.values():
            self._call(worker, "Initialize", None, lambda w=worker: w.client.initialize(spec, self.config.seed, self.config.dataset, w.objective))
            worker.describe = self._call(worker, "Describe", None, worker.client.describe)

    def check_compatible(self) -> None:
        """Refuse to relay between workers whose parameters or data differ, or that are not what their names say."""
        problems = []
        described = {name: w.describe for name, w in self.workers.items()}
        if set(described) == {"torch", "keras"} and (described["torch"].framework, described["keras"].framework) == ("keras", "torch"):
            problems.append(
                f"the addresses are swapped: {self.workers['torch'].client.address} is the keras worker and "
                f"{self.workers['keras'].client.address} the torch worker; exchange --torch and --keras"
            )
        else:
            for name, d in described.items():
                expected = name.split("-", 1)[0]
                if expected in WORKER_MODULES and d.framework != expected:
                    problems.append(f"worker {name} at {self.workers[name].client.address} is a {d.framework} worker; check its address")
        first, first_d = next(iter(described.items()))
        first_specs = {p.name: p for p in first_d.parameters}
        for name, d in list(described.items())[1:]:
            specs = {p.name: p for p in d.parameters}
            for tensor in sorted(set(first_specs) | set(specs)):
                a, b = first_specs.get(tensor), specs.get(tensor)
                if a is None or b is None:
                    problems.append(f"tensor {tensor} exists only on the {name if a is None else first} worker")
                elif list(a.shape) != list(b.shape) or a.dtype != b.dtype:
                    problems.append(
                        f"workers disagree on tensor {tensor}: {first} has {list(a.shape)} {pb.DType.Name(a.dtype)}, "
                        f"{name} has {list(b.shape)} {pb.DType.Name(b.dtype)}"
                    )
            if d.dataset.fingerprint != first_d.dataset.fingerprint:
                problems.append(
                    f"workers hold different data: {first} {first_d.dataset.data_dir} (fingerprint {first_d.dataset.fingerprint[:12]}), "
                    f"{name} {d.dataset.data_dir} (fingerprint {d.dataset.fingerprint[:12]}); give all the same {first_d.dataset.name} files"
                )
        if problems:
            raise IncompatibleWorkers("; ".join(problems))

    def train(self, worker: Worker, round_index: int) -> dict[str, Any]:
        request = pb.TrainRequest(
            epochs=self.config.epochs,
            batch_size=self.config.batch_size,
            learning_rate=self.config.lr,
            momentum=self.config.momentum,
            seed=self.config.train_seed(round_index),
            objective=worker.objective,
            max_samples=self.config.max_train_samples,
            progress_every_batches=50,
        )

        def run() -> pb.TrainSummary:
            summary = None
            stream = worker.client.train(request, timeout=self.config.train_deadline())
            try:
                for event in stream:
                    if event.WhichOneof("event") == "summary":
                        summary = event.summary
                    else:
                        self.on_event("train_progress", {"round": round_index, "worker": worker.name, **message_to_dict(event.progress)})
            except BaseException:
                stream.cancel()  # stop the worker's training too (Ctrl-C, errors)
                raise
            if summary is None:
                raise RoundFailed(f"round {round_index}: the {worker.name} worker's Train stream ended without a summary")
            return summary

        self.on_event("step", {"round": round_index, "step": f"{worker.name}: train"})
        summary = self._call(worker, f"{worker.name} trains (Train)", round_index, run)
        record = {"worker": worker.name, **message_to_dict(summary)}
        self.on_event("train_done", {"round": round_index, **record})
        return record

    def evaluate(self, worker: Worker, phase: str, round_index: int | None) -> tuple[dict[str, Any], pb.EvaluateReply]:
        self.on_event("step", {"round": round_index, "step": f"{worker.name}: evaluate"})
        record, reply = self._scored(worker, phase, round_index)
        self.on_event("evaluation", {"round": round_index, **record})
        return record, reply

    def _scored(self, worker: Worker, phase: str, round_index: int | None) -> tuple[dict[str, Any], pb.EvaluateReply]:
        reply = self._call(worker, f"{phase} (Evaluate)", round_index, lambda: worker.client.evaluate(True, True))
        return evaluation_record(worker.name, phase, reply, self.pairs), reply

    def move(self, sender: Worker, receiver: Worker, round_index: int | None, expected_sha256: str = "") -> dict[str, Any]:
        """The weights sender -> receiver, pulled by the receiver or forwarded (coordinator.moves); never held here."""
        self.on_event("step", {"round": round_index, "step": f"move {sender.name} -> {receiver.name}"})
        done = self._call(receiver, f"move {sender.name}->{receiver.name}", round_index,
                          lambda: moves.move(sender.client, receiver.client, self.config.via_coordinator, expected_sha256, self.config.call_timeout))
        return {
            "from": sender.name,
            "to": receiver.name,
            "path": done.path,
            "seconds": done.seconds,
            "bytes": done.bytes,
            "tensors": done.tensors,
            "sha256": done.sha256,
        }

    @staticmethod
    def agreement(sent: pb.EvaluateReply, received: pb.EvaluateReply) -> dict[str, Any]:
        """How differently the receiver's framework behaves on the sender's weights and data."""
        sent_p, recv_p = codec.from_proto(sent.probabilities), codec.from_proto(received.probabilities)
        differ = np.asarray(sent.predictions) != np.asarray(received.predictions)
        return {
            "differing_predictions": int(differ.sum()),
            "max_abs_probability_diff": float(np.abs(sent_p.astype(np.float64) - recv_p).max()),
            "same_weights": sent.weights_sha256 == received.weights_sha256,
        }

    def _measured_move(self, sender: Worker, receiver: Worker, sent: pb.EvaluateReply, phase: str, round_index: int | None) -> tuple[dict, dict, pb.EvaluateReply]:
        transfer = self.move(sender, receiver, round_index, sent.weights_sha256)
        record, received = self.evaluate(receiver, phase, round_index)
        return self._compared(transfer, sent, received, phase, round_index), record, received

    def _compared(self, transfer: dict[str, Any], sent: pb.EvaluateReply, received: pb.EvaluateReply, phase: str,
                  round_index: int | None) -> dict[str, Any]:
        """A move's record with how the receiver's predictions compare with the sender's, announced."""
        transfer.update(self.agreement(sent, received), receiver_phase=phase)
        self.on_event("transfer", {"round": round_index, **transfer})
        return transfer

    def _hand_on(self, sender: Worker, receiver: Worker, trained_sha256: str, round_index: int) -> tuple[dict, dict, dict]:
        """After `sender` trained: its weights move to `receiver`, then both evaluate them at once (two
        processes, each its own model), instead of the sender evaluating before the move and the
        receiver after. Returns the move, the sender's evaluation and the receiver's."""
        phase = f"{receiver.name}_from_{sender.name}"
        transfer = self.move(sender, receiver, round_index, trained_sha256)
        self.on_event("step", {"round": round_index, "step": f"{sender.name} and {receiver.name}: evaluate"})
        pending = self._beside.submit(self._scored, sender, f"{sender.name}_trained", round_index)
        try:
            received_record, received = self._scored(receiver, phase, round_index)
        finally:
            trained_record, sent = pending.result()  # also when the receiver's failed: never leave it running
        for record in (trained_record, received_record):  # events in the order of the round, from this thread
            self.on_event("evaluation", {"round": round_index, **record})
        return self._compared(transfer, sent, received, phase, round_index), trained_record, received_record

    # -- checkpoints ---------------------------------------------------------------------
    def _checkpoint(self, round_index: int) -> dict[str, Any]:
        """Save both workers' weights after a completed round (see coordinator.checkpoint)."""
        files, sums = {}, {}
        for name, worker in self.workers.items():
            weights = self._call(worker, f"checkpoint {name} (GetWeights)", round_index, worker.client.get_weights)
            files[name] = checkpoint.save(self.run_dir, round_index, name, weights)
            sums[name] = codec.weights_sha256(weights)
        return {"round": round_index, "files": files, "sha256": sums}

    def _restore(self, saved: dict[str, Any]) -> None:
        """Put the weights of the last completed round back into both workers."""
        for name, worker in self.workers.items():
            try:
                weights = checkpoint.load(self.run_dir, saved["files"][name], saved["sha256"][name])
            except (KeyError, ValueError) as exc:
                raise UsageError(f"cannot resume {self.run_dir}: {exc}") from None
            self.on_event("step", {"round": None, "step": f"restore {name} from round {saved['round']}"})
            self._call(worker, f"restore {name} (SetWeights)", None, lambda w=worker, ws=weights: w.client.set_weights(ws))

    # -- the whole run -------------------------------------------------------------------
    @contextmanager
    def _recorded(self, resumable: bool = True) -> Iterator[None]:
        """Around a whole run: its final status in results.json whatever happens (complete, interrupted,
        failed with the error and, where rounds can be resumed, how), and the channels closed."""
        try:
            yield
            self.results["status"] = "complete"
        except KeyboardInterrupt:
            self.results["status"] = "interrupted"
            raise
        except CoordinatorError as exc:
            self.results["status"] = "failed"
            if resumable and (self.results["rounds"] or not isinstance(exc, (UsageError, IncompatibleWorkers))):
                done = len(self.results["rounds"])
                kept = f"rounds 0-{done - 1} are kept" if done else "no round finished"
                exc.args = (f"{exc}; {kept}: continue with `coordinator run --resume {self.run_dir}`",)
            self.results["error"] = str(exc)
            raise
        finally:
            self.results["finished_at"] = _now()
            self._save()
            self._beside.shutdown(wait=False)
            for worker in self.workers.values():
                worker.client.close()
        self.on_event("done", {"run_dir": str(self.run_dir), "results": str(self.run_dir / RESULTS_FILE)})

    def _start(self, previous: dict[str, Any] | None) -> None:
        if previous is not None:
            self.results = previous
            self.results.update(status="running", finished_at=None, config=self.config.to_dict())
            self.results.pop("error", None)
            self.results.setdefault("resumed", []).append({"at": _now(), "from_round": len(previous["rounds"])})
        else:
            self.results = {
                "schema_version": SCHEMA_VERSION,
                "weightrelay_version": weightrelay.__version__,
                "status": "running",
                "started_at": _now(),
                "finished_at": None,
                "config": self.config.to_dict(),
                "workers": {},
                "order": [],
                "objectives": {},
                "swap_pairs": [],
                "initial_sync": None,
                "rounds": [],
            }

    def _initial_sync(self, ring: list[Worker]) -> None:
        """Every worker starts from the first one's initial weights."""
        first = ring[0]
        initial, first_reply = self.evaluate(first, f"{first.name}_initial", None)
        evaluations, moves = [initial], []
        for other in ring[1:]:
            move, record, _ = self._measured_move(first, other, first_reply, f"{other.name}_initial", None)
            evaluations.append(record)
            moves.append(move)
        self.results["initial_sync"] = {"evaluations": evaluations, "moves": moves}
        self._save()

    def _round(self, ring: list[Worker], r: int) -> dict[str, Any]:
        started = time.perf_counter()
        evaluations, moves, train = [], [], {}
        for i, worker in enumerate(ring):
            receiver = ring[(i + 1) % len(ring)]
            train[worker.name] = self.train(worker, r)
            move, trained, received = self._hand_on(worker, receiver, train[worker.name]["weights_sha256"], r)
            evaluations += [trained, received]
            moves.append(move)
        return {"round": r, "evaluations": evaluations, "train": train, "moves": moves, "wall_seconds": time.perf_counter() - started}

    def run(self, addresses: dict[str, str], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole run; with `previous` (a failed or interrupted run's results) it continues from its first
        unfinished round, with the weights saved after the last finished one."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start(previous)
        with self._recorded():
            names = self.config.ring(list(addresses))
            self.connect({name: addresses[name] for name in names})
            self.pairs = swap_pairs([w.objective for w in self.workers.values()])
            self.initialize()
            self.results.update(
                workers={name: {"address": w.client.address, **message_to_dict(w.describe)} for name, w in self.workers.items()},
                order=names,
                objectives={name: w.objective for name, w in self.workers.items()},
                swap_pairs=[list(p) for p in self.pairs],
            )
            self.check_compatible()
            self.on_event("start", {"run_dir": str(self.run_dir), "config": self.config.to_dict(), "workers": self.results["workers"]})
            ring = [self.workers[name] for name in names]

            first = len(self.results["rounds"])
            if first:
                self._restore(self.results["checkpoint"])
            else:
                self._initial_sync(ring)

            for r in range(first, self.config.rounds):
                item = self._round(ring, r)
                saved = self._checkpoint(r)
                self.results["rounds"].append(item)
                previous_checkpoint, self.results["checkpoint"] = self.results.get("checkpoint"), saved
                self._save()
                if previous_checkpoint and previous_checkpoint["round"] != r:
                    checkpoint.remove_round(self.run_dir, previous_checkpoint["round"], list(self.workers))
                self.on_event("round_done", {"round": r, "rounds": self.config.rounds, "wall_seconds": item["wall_seconds"]})
        return self.results
