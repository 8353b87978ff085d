"""The experiment: relay one set of weights between the two workers for N rounds.

Each round: PyTorch trains -> evaluate PyTorch (torch_trained) -> move weights PyTorch to
Keras -> evaluate Keras (keras_from_torch) -> Keras trains -> evaluate Keras (keras_trained)
-> move weights Keras to PyTorch -> evaluate PyTorch (torch_from_keras). At each move the
receiver's predictions are compared with the sender's on the whole test set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

import weightrelay
from coordinator import checkpoint
from coordinator.config import RunConfig
from coordinator.errors import CoordinatorError, IncompatibleWorkers, RoundFailed, UsageError, WorkerUnreachable
from coordinator.results import RESULTS_FILE, SCHEMA_VERSION, evaluation_record, message_to_dict
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

    # -- plumbing ------------------------------------------------------------------------
    def _call(self, worker: Worker, what: str, round_index: int | None, fn: Callable[[], Any]) -> Any:
        """Run one RPC, turning gRPC failures into errors that name the worker, the round and the step."""
        where = f"round {round_index}, " if round_index is not None else "before round 0, "
        try:
            return fn()
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise WorkerUnreachable(worker.name, worker.client.address, f"{where}{what}: {details}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RoundFailed(f"{where}{what}: the {worker.name} worker at {worker.client.address} did not finish within its deadline "
                                  "(DEADLINE_EXCEEDED); is it stopped or overloaded? (--call-timeout, --train-timeout)") from None
            raise RoundFailed(f"{where}{what} on the {worker.name} worker at {worker.client.address} failed: {code.name}: {details}") from None
        except codec.TensorError as exc:
            raise RoundFailed(f"{where}{what} on the {worker.name} worker at {worker.client.address}: bad weights stream: {exc}") from None

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
        objectives = {"torch": self.config.torch_objective, "keras": self.config.keras_objective}
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
            worker = Worker(name, client, objectives[name])
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
        """Refuse to relay between workers whose parameters or data differ."""
        torch_d, keras_d = self.workers["torch"].describe, self.workers["keras"].describe
        torch_specs = {p.name: p for p in torch_d.parameters}
        keras_specs = {p.name: p for p in keras_d.parameters}
        problems = []
        if (torch_d.framework, keras_d.framework) == ("keras", "torch"):
            problems.append(
                f"the addresses are swapped: {self.workers['torch'].client.address} is the keras worker and "
                f"{self.workers['keras'].client.address} the torch worker; exchange --torch and --keras"
            )
        for name in sorted(set(torch_specs) | set(keras_specs)):
            t, k = torch_specs.get(name), keras_specs.get(name)
            if t is None or k is None:
                problems.append(f"tensor {name} exists only on the {'keras' if t is None else 'torch'} worker")
            elif list(t.shape) != list(k.shape) or t.dtype != k.dtype:
                problems.append(
                    f"workers disagree on tensor {name}: torch has {list(t.shape)} {pb.DType.Name(t.dtype)}, "
                    f"keras has {list(k.shape)} {pb.DType.Name(k.dtype)}"
                )
        if torch_d.dataset.fingerprint != keras_d.dataset.fingerprint:
            problems.append(
                f"workers hold different data: torch {torch_d.dataset.data_dir} (fingerprint {torch_d.dataset.fingerprint[:12]}), "
                f"keras {keras_d.dataset.data_dir} (fingerprint {keras_d.dataset.fingerprint[:12]}); give both the same {torch_d.dataset.name} files"
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
        reply = self._call(worker, f"{phase} (Evaluate)", round_index, lambda: worker.client.evaluate(True, True))
        record = evaluation_record(worker.name, phase, reply)
        self.on_event("evaluation", {"round": round_index, **record})
        return record, reply

    def move(self, sender: Worker, receiver: Worker, round_index: int | None) -> dict[str, Any]:
        self.on_event("step", {"round": round_index, "step": f"move {sender.name} -> {receiver.name}"})
        started = time.perf_counter()
        step = f"move {sender.name}->{receiver.name}"
        weights = self._call(sender, f"{step} (GetWeights)", round_index, sender.client.get_weights)
        reply = self._call(receiver, f"{step} (SetWeights)", round_index, lambda: receiver.client.set_weights(weights))
        return {
            "from": sender.name,
            "to": receiver.name,
            "seconds": time.perf_counter() - started,
            "bytes": reply.total_bytes,
            "tensors": reply.tensor_count,
            "sha256": reply.sha256,
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
        transfer = self.move(sender, receiver, round_index)
        record, received = self.evaluate(receiver, phase, round_index)
        transfer.update(self.agreement(sent, received), receiver_phase=phase)
        self.on_event("transfer", {"round": round_index, **transfer})
        return transfer, record, received

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
    def run(self, addresses: dict[str, str], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole run; with `previous` (a failed or interrupted run's results) it continues from its first
        unfinished round, with the weights saved after the last finished one."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
                "initial_sync": None,
                "rounds": [],
            }
        try:
            self.connect(addresses)
            self.initialize()
            self.results["workers"] = {name: {"address": w.client.address, **message_to_dict(w.describe)} for name, w in self.workers.items()}
            self.check_compatible()
            self.on_event("start", {"run_dir": str(self.run_dir), "config": self.config.to_dict(), "workers": self.results["workers"]})
            torch_w, keras_w = self.workers["torch"], self.workers["keras"]

            first = len(self.results["rounds"])
            if first:
                self._restore(self.results["checkpoint"])
            else:  # Both start from PyTorch's initial weights.
                _, torch_initial = self.evaluate(torch_w, "torch_initial", None)
                transfer, keras_initial, _ = self._measured_move(torch_w, keras_w, torch_initial, "keras_initial", None)
                self.results["initial_sync"] = {"transfer": transfer, "evaluation": keras_initial}
                self._save()

            for r in range(first, self.config.rounds):
                started = time.perf_counter()
                train = {"torch": self.train(torch_w, r)}
                t_trained, t_reply = self.evaluate(torch_w, "torch_trained", r)
                to_keras, k_from_t, _ = self._measured_move(torch_w, keras_w, t_reply, "keras_from_torch", r)
                train["keras"] = self.train(keras_w, r)
                k_trained, k_reply = self.evaluate(keras_w, "keras_trained", r)
                to_torch, t_from_k, _ = self._measured_move(keras_w, torch_w, k_reply, "torch_from_keras", r)
                saved = self._checkpoint(r)
                self.results["rounds"].append({
                    "round": r,
                    "evaluations": [t_trained, k_from_t, k_trained, t_from_k],
                    "train": train,
                    "transfers": [to_keras, to_torch],
                    "wall_seconds": time.perf_counter() - started,
                })
                previous_checkpoint, self.results["checkpoint"] = self.results.get("checkpoint"), saved
                self._save()
                if previous_checkpoint and previous_checkpoint["round"] != r:
                    checkpoint.remove_round(self.run_dir, previous_checkpoint["round"], list(self.workers))
                self.on_event("round_done", {"round": r, "rounds": self.config.rounds, "wall_seconds": self.results["rounds"][-1]["wall_seconds"]})
            self.results["status"] = "complete"
        except KeyboardInterrupt:
            self.results["status"] = "interrupted"
            raise
        except CoordinatorError as exc:
            self.results["status"] = "failed"
            if self.results["rounds"] or not isinstance(exc, (UsageError, IncompatibleWorkers)):
                done = len(self.results["rounds"])
                kept = f"rounds 0-{done - 1} are kept" if done else "no round finished"
                exc.args = (f"{exc}; {kept}: continue with `coordinator run --resume {self.run_dir}`",)
            self.results["error"] = str(exc)
            raise
        finally:
            self.results["finished_at"] = _now()
            self._save()
            for worker in self.workers.values():
                worker.client.close()
        self.on_event("done", {"run_dir": str(self.run_dir), "results": str(self.run_dir / RESULTS_FILE)})
        return self.results
