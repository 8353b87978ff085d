"""Relay and twin runs in one process against fake workers: the results.json they write (schema 2,
key for key), resuming from it, how refusals end a run, and when a move falls back to forwarding."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from coordinator import config as cfg
from coordinator import moves, session
from coordinator.errors import SettingsRefused
from coordinator.records import RelayResults, from_json, to_json
from coordinator.relay import Relay
from coordinator.results import load_results
from coordinator.twin import Twin
from weightrelay import codec, errors
from weightrelay.v1 import worker_pb2 as pb

CLASSES = 10


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str = ""):
        self._code, self._message, self._trailers = code, message, ()
        if reason:
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=errors.DOMAIN))
            status = status_pb2.Status(code=code.value[0], message=message, details=[info])
            self._trailers = ((errors.DETAILS_KEY, status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self):
        return self._trailers


class FakeWorker:
    """A worker's model as numbers: training adds the learning rate; scores follow from the weights."""

    def __init__(self, framework: str):
        self.framework = framework
        self.weights: dict[str, np.ndarray] = {}
        self.refuse_initialize = ""

    def sha(self) -> str:
        return codec.weights_sha256(self.weights)

    def evaluate(self) -> pb.EvaluateReply:
        level = float(self.weights["fc.bias"][0])
        confusion = np.full((CLASSES, CLASSES), 1) + np.eye(CLASSES, dtype=int) * (10 + int(level * 100) % 50)
        probabilities = np.full((20, CLASSES), 1 / CLASSES, np.float32)
        return pb.EvaluateReply(
            loss=1 / (1 + level), accuracy=min(level, 1.0), samples=int(confusion.sum()),
            confusion_matrix=[pb.ConfusionRow(counts=[int(c) for c in row]) for row in confusion],
            per_class=[pb.ClassMetrics(label=i, precision=0.5, recall=0.5, f1=0.5, support=int(confusion[i].sum())) for i in range(CLASSES)],
            predictions=[i % CLASSES for i in range(20)], probabilities=codec.to_proto("probabilities", probabilities),
            seconds=0.01, weights_sha256=self.sha(),
        )


class FakeStream:
    def __init__(self, events):
        self._events = iter(events)

    def __iter__(self):
        return self._events

    def cancel(self) -> None:
        pass


class FakeClient:
    """WorkerClient's surface over a FakeWorker of NETWORK."""

    network: dict[str, FakeWorker] = {}

    def __init__(self, address: str, timeout: float | None = None, security=None):
        self.address, self.accepts_packed_pieces = address, False
        self.stub = self
        self.lease_id = ""

    @property
    def worker(self) -> FakeWorker:
        if self.address not in self.network:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return self.network[self.address]

    def wait_ready(self, timeout: float) -> None:
        if self.address not in self.network:
            raise grpc.FutureTimeoutError()

    def close(self) -> None:
        pass

    def describe(self) -> pb.DescribeReply:
        w = self.worker
        return pb.DescribeReply(
            framework=w.framework, framework_version="1", backend="numpy", device="cpu", architecture="fake: 4 -> 10",
            parameters=[pb.TensorSpec(name=n, dtype=pb.FLOAT32, shape=list(a.shape)) for n, a in w.weights.items()],
            dataset=pb.DatasetInfo(name="mnist", fingerprint="f" * 64, train_samples=1000, test_samples=20,
                                   class_names=[str(i) for i in range(CLASSES)]),
            weights_sha256=w.sha(),
        )

    def initialize(self, spec, seed: int, dataset: str, objective: str, lease: pb.LeaseRequest | None = None) -> pb.InitializeReply:
        w = self.worker
        self.lease_id = f"lease-{lease.run_id}" if lease is not None else ""
        if w.refuse_initialize:
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, w.refuse_initialize)
        rng = np.random.default_rng(seed)
        w.weights = {"fc.weight": rng.normal(size=(CLASSES, 4)).astype(np.float32), "fc.bias": np.zeros(CLASSES, np.float32)}
        return pb.InitializeReply(weights_sha256=w.sha(), objective=objective)

    def train(self, request: pb.TrainRequest, timeout: float | None = None) -> FakeStream:
        w = self.worker
        steps = request.max_steps or 10
        w.weights = {n: a + np.float32(request.learning_rate * steps / 10) for n, a in w.weights.items()}
        summary = pb.TrainSummary(epochs=request.epochs, samples_seen=steps * request.batch_size, loss=0.5, accuracy=0.75,
                                  seconds=0.1, objective=request.objective, weights_sha256=w.sha())
        progress = pb.TrainProgress(epoch=1, epochs=1, batch=steps, batches=steps, loss=0.5, accuracy=0.75, samples_per_second=1e4)
        return FakeStream([pb.TrainEvent(progress=progress), pb.TrainEvent(summary=summary)])

    def renew_lease(self, seconds: int = 0, timeout: float | None = None) -> pb.Lease:
        return pb.Lease(lease_id=self.lease_id)

    def release_lease(self, force: bool = False, timeout: float | None = None) -> pb.ReleaseLeaseReply:
        self.lease_id = ""
        return pb.ReleaseLeaseReply(released=True)

    def train_to_end(self, request: pb.TrainRequest, timeout: float | None = None) -> pb.TrainSummary:
        return list(self.train(request, timeout))[-1].summary

    def evaluate(self, include_predictions: bool = False, include_probabilities: bool = False) -> pb.EvaluateReply:
        return self.worker.evaluate()

    def get_weights(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self.worker.weights.items()}

    def set_weights(self, weights) -> pb.SetWeightsReply:
        self.worker.weights = {n: np.array(a) for n, a in weights.items()}
        return pb.SetWeightsReply(tensor_count=len(weights), total_bytes=sum(a.nbytes for a in weights.values()), sha256=self.worker.sha())

    def PullWeights(self, request: pb.PullWeightsRequest, timeout: float | None = None) -> pb.SetWeightsReply:  # noqa: N802 (the stub's name)
        return self.set_weights(FakeClient(request.address).get_weights())


@pytest.fixture
def network(monkeypatch):
    """Workers torch and keras at 10.0.0.1:1 and :2, jax at :3, torch-b at :4, reached through FakeClient."""
    workers = {"10.0.0.1:1": FakeWorker("torch"), "10.0.0.1:2": FakeWorker("keras"), "10.0.0.1:3": FakeWorker("jax"),
               "10.0.0.1:4": FakeWorker("torch")}
    monkeypatch.setattr(FakeClient, "network", workers)
    monkeypatch.setattr(session, "WorkerClient", FakeClient)
    return workers


def relay(tmp_path: Path, rounds: int = 2, **settings) -> tuple[dict, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    config = cfg.resolve({"rounds": rounds, "torch": "10.0.0.1:1", "keras": "10.0.0.1:2", **settings})
    Relay(config, tmp_path / "run", lambda kind, event: events.append((kind, event))).run(config.addresses())
    return load_results(tmp_path / "run"), events


def keys(value):
    """The structure of a JSON value: its keys, all the way down (lists by their first item)."""
    if isinstance(value, dict):
        return {key: keys(item) for key, item in value.items()}
    if isinstance(value, list) and value:
        return [keys(value[0])]
    return type(value).__name__


EVALUATION = {"worker": "str", "phase": "str", "accuracy": "float", "loss": "float", "swap_rate": "float", "swap_rates": {"1<->7": "float"},
              "confusion_matrix": [["int"]], "per_class": [{"label": "int", "precision": "float", "recall": "float", "f1": "float", "support": "int"}],
              "weights_sha256": "str", "seconds": "float"}
MOVE = {"from": "str", "to": "str", "path": "str", "seconds": "float", "bytes": "int", "tensors": "int", "sha256": "str",
        "differing_predictions": "int", "max_abs_probability_diff": "float", "same_weights": "bool", "receiver_phase": "str"}
TRAIN = {"worker": "str", "epochs": "int", "samples_seen": "str", "loss": "float", "accuracy": "float", "seconds": "float",
         "objective": "str", "weights_sha256": "str"}


def test_a_relay_writes_schema_2_key_for_key(network, tmp_path):
    results, events = relay(tmp_path)
    assert results["schema_version"] == 2 and results["status"] == "complete" and results["finished_at"]
    assert results["order"] == ["torch", "keras"] and results["objectives"] == {"torch": "swap:1,7", "keras": "identity"}
    assert results["swap_pairs"] == [[1, 7]]
    assert set(results) == {"schema_version", "weightrelay_version", "status", "started_at", "finished_at", "config", "workers",
                            "order", "objectives", "swap_pairs", "initial_sync", "rounds", "checkpoint"}
    assert keys(results["initial_sync"]) == {"evaluations": [EVALUATION], "moves": [MOVE]}
    assert keys(results["rounds"][0]) == {"round": "int", "evaluations": [EVALUATION], "train": {"torch": TRAIN, "keras": TRAIN},
                                          "moves": [MOVE], "wall_seconds": "float"}
    assert keys(results["checkpoint"]) == {"round": "int", "files": {"torch": "str", "keras": "str"}, "sha256": {"torch": "str", "keras": "str"}}
    assert results["workers"]["torch"]["address"] == "10.0.0.1:1" and results["workers"]["keras"]["framework"] == "keras"
    assert {"torch", "keras", "torch_objective", "keras_objective"} <= set(results["config"])  # the aliases, as readers expect
    assert results["config"]["torch"] == "10.0.0.1:1" and results["config"]["torch_objective"] == "swap:1,7"
    evaluations = [event for kind, event in events if kind == "evaluation"]
    assert [e["phase"] for e in evaluations] == ["torch_initial", "keras_initial"] + ["torch_trained", "keras_from_torch",
                                                                                      "keras_trained", "torch_from_keras"] * 2
    assert all(e.keys() == {"round", *EVALUATION} for e in evaluations)
    assert [kind for kind, _ in events][0] == "start" and [kind for kind, _ in events][-1] == "done"


def test_the_results_read_back_into_the_same_records(network, tmp_path):
    results, _ = relay(tmp_path)
    assert to_json(from_json(RelayResults, results)) == results


def test_a_resumed_run_continues_the_record(network, tmp_path):
    results, _ = relay(tmp_path, rounds=1)
    results["status"] = "failed"
    results["error"] = "round 1, ... failed"
    (tmp_path / "run" / "results.json").write_text(json.dumps(results))
    config = cfg.resolve({"rounds": 2, "torch": "10.0.0.1:1", "keras": "10.0.0.1:2"})
    Relay(config, tmp_path / "run", lambda kind, event: None).run(config.addresses(), results)
    resumed = load_results(tmp_path / "run")
    assert resumed["status"] == "complete" and "error" not in resumed and resumed["started_at"] == results["started_at"]
    assert [r["round"] for r in resumed["rounds"]] == [0, 1] and resumed["rounds"][0] == results["rounds"][0]
    assert resumed["resumed"] == [{"at": resumed["resumed"][0]["at"], "from_round": 1}] and resumed["checkpoint"]["round"] == 1
    assert sorted(p.name for p in (tmp_path / "run" / "weights").iterdir()) == ["round-001-keras.safetensors", "round-001-torch.safetensors"]


def test_swap_pairs_follow_the_objectives_not_the_names(network, tmp_path):
    results, _ = relay(tmp_path, rounds=1, worker=["keras=10.0.0.1:2", "jax=10.0.0.1:3"], objective=["jax=swap:3,8"])
    assert results["objectives"] == {"keras": "identity", "jax": "swap:3,8"} and results["swap_pairs"] == [[3, 8]]
    assert set(results["rounds"][0]["evaluations"][0]["swap_rates"]) == {"3<->8"}


def test_a_twin_run_writes_its_checkpoints(network, tmp_path):
    config = cfg.resolve({"worker": ["torch=10.0.0.1:1", "torch-b=10.0.0.1:4"], "epochs": 2, "batch_size": 500})
    Twin(config, tmp_path / "twin", lambda kind, event: None).run(config.addresses())
    results = load_results(tmp_path / "twin")
    assert results["kind"] == "twin" and results["schema_version"] == 2 and results["status"] == "complete"
    assert results["steps"] == {"per_epoch": 2, "total": 4} and results["objectives"] == {"torch": "identity", "torch-b": "identity"}
    assert [c["step"] for c in results["checkpoints"]] == [0, 1, 2, 4]
    first, last = results["checkpoints"][0], results["checkpoints"][-1]
    assert "train_seconds" not in first and last["train_seconds"] >= 0
    pair = last["pairs"]["torch/torch-b"]
    assert keys(pair) == {"relative_l2": "float", "max_abs": "float", "per_tensor": {"relative_l2": {"fc.weight": "float", "fc.bias": "float"},
                                                                                      "max_abs": {"fc.weight": "float", "fc.bias": "float"}},
                          "differing_predictions": "int"}
    assert pair["relative_l2"] == 0 and keys(last["workers"]["torch"]) == {"accuracy": "float", "loss": "float", "weights_sha256": "str",
                                                                             "confusion_matrix": [["int"]]}


def test_workers_swapped_between_the_default_addresses_are_named(network, tmp_path):
    with pytest.raises(Exception, match="the addresses are swapped: 10.0.0.1:2 is the keras worker and 10.0.0.1:1 the torch worker; "
                                        "exchange --torch and --keras"):
        relay(tmp_path, torch="10.0.0.1:2", keras="10.0.0.1:1")
    assert load_results(tmp_path / "run")["workers"]["torch"]["framework"] == "keras"


def test_settings_a_worker_refuses_end_the_run_as_a_usage_error_without_resume(network, tmp_path):
    network["10.0.0.1:2"].refuse_initialize = "model 'x' ends in shape [5], but the data set has 10 classes"
    with pytest.raises(SettingsRefused) as refused:
        relay(tmp_path)
    assert refused.value.exit_code == 2
    assert "before round 0, Initialize: the keras worker at 10.0.0.1:2 refuses the run's settings: model 'x'" in str(refused.value)
    assert "--resume" not in str(refused.value)
    assert load_results(tmp_path / "run")["status"] == "failed"


class PullRefused:
    """A receiver whose PullWeights fails with `error`; a sender that records whether it was forwarded from."""

    def __init__(self, error: grpc.RpcError):
        self.error, self.address, self.stub, self.forwarded = error, "10.0.0.1:1", self, False
        self.accepts_packed_pieces = False
        self.receives_transposed = ()

    def PullWeights(self, request, timeout=None):  # noqa: N802 (the stub's name)
        raise self.error

    def get_weights_serialized(self, timeout=None, pack=False, transposed=()):
        self.forwarded = True
        raise RuntimeError("forwarded")


@pytest.mark.parametrize("error, forwards", [
    (FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "busy", errors.WORKER_TRAINING), False),
    (FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "the worker is training", errors.WORKER_TRAINING), False),
    (FakeRpcError(grpc.StatusCode.UNAVAILABLE, "cannot reach the sender: its training port is closed"), True),
    (FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "the sender's weights are not the expected ones"), True),
    (FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "another model"), False),
], ids=["training-reason", "training-reason-and-word", "unreachable-mentioning-training", "wrong-sender", "refused"])
def test_a_move_falls_back_on_the_code_and_the_reason_never_the_message(error, forwards):
    sender, receiver = PullRefused(error), PullRefused(error)
    with pytest.raises(RuntimeError if forwards else FakeRpcError):
        moves.move(sender, receiver, expected_sha256="ab" * 32, timeout=5)
    assert sender.forwarded == forwards
