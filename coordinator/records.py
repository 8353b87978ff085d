"""What a run records, as typed records, and the one writer that turns them into results.json.

The file is schema 2 (`coordinator.results` describes it and reads both schemas): each record's
fields are its JSON keys in order, except where a field's metadata says otherwise (`key`: another
name, e.g. a move's "from"; `flatten`: its keys are the parent's; `omit`: left out while unset).
Protobuf messages a worker sent (a Train summary, a Describe) are kept as they came and written
in protobuf's JSON mapping. `from_json` reads a schema-2 file back, e.g. to resume a run.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

import weightrelay
from coordinator.results import RESULTS_FILE, SCHEMA_VERSION, pair_name, swap_rate
from weightrelay import codec
from weightrelay.files import write_json_atomic
from weightrelay.v1 import worker_pb2 as pb

R = TypeVar("R")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _named(key: str) -> Any:
    return field(metadata={"key": key})


def _flattened(factory: Any = None) -> Any:
    """A field whose keys are its parent's."""
    if factory is not None:
        return field(default_factory=factory, metadata={"flatten": True})
    return field(metadata={"flatten": True})


def _optional(default: Any = None, factory: Any = None) -> Any:
    """A field left out of the file while it is None or empty."""
    if factory is not None:
        return field(default_factory=factory, metadata={"omit": True})
    return field(default=default, metadata={"omit": True})


def message_to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


# -- a relay run --------------------------------------------------------------------------
@dataclass
class ClassScore:
    label: int
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Evaluation:
    """One worker's scores on the test set against the true labels, at one phase of the run."""

    worker: str
    phase: str
    accuracy: float
    loss: float
    swap_rate: float  # of the first pair (the only one before rings)
    swap_rates: dict[str, float]
    confusion_matrix: list[list[int]]
    per_class: list[ClassScore]
    weights_sha256: str
    seconds: float

    @classmethod
    def of(cls, worker: str, phase: str, reply: pb.EvaluateReply, pairs: Sequence[tuple[int, int]]) -> "Evaluation":
        confusion = [list(row.counts) for row in reply.confusion_matrix]
        return cls(
            worker=worker, phase=phase, accuracy=reply.accuracy, loss=reply.loss,
            swap_rate=swap_rate(confusion, *pairs[0]),
            swap_rates={pair_name(p): swap_rate(confusion, *p) for p in pairs},
            confusion_matrix=confusion,
            per_class=[ClassScore(c.label, c.precision, c.recall, c.f1, c.support) for c in reply.per_class],
            weights_sha256=reply.weights_sha256, seconds=reply.seconds,
        )


@dataclass
class Agreement:
    """How differently the receiver's framework behaves on the sender's weights and data."""

    differing_predictions: int
    max_abs_probability_diff: float
    same_weights: bool

    @classmethod
    def between(cls, sent: pb.EvaluateReply, received: pb.EvaluateReply) -> "Agreement":
        sent_p, recv_p = codec.from_proto(sent.probabilities), codec.from_proto(received.probabilities)
        differ = np.asarray(sent.predictions) != np.asarray(received.predictions)
        return cls(int(differ.sum()), float(np.abs(sent_p.astype(np.float64) - recv_p).max()),
                   sent.weights_sha256 == received.weights_sha256)


@dataclass
class MoveRecord:
    """One move of the weights and what the receiver made of them."""

    sender: str = _named("from")
    receiver: str = _named("to")
    path: str  # "pull" or "forward"
    seconds: float
    bytes: int
    tensors: int
    sha256: str
    agreement: Agreement = _flattened()
    receiver_phase: str


@dataclass
class TrainRecord:
    worker: str
    summary: pb.TrainSummary = _flattened()


@dataclass
class Round:
    round: int
    evaluations: list[Evaluation]
    train: dict[str, TrainRecord]
    moves: list[MoveRecord]
    wall_seconds: float


@dataclass
class InitialSync:
    """Every worker given the first one's initial weights: its evaluation, then each move and the receiver's."""

    evaluations: list[Evaluation]
    moves: list[MoveRecord]


@dataclass
class Checkpoint:
    """The weights saved after a completed round: files relative to the run directory, and their checksums."""

    round: int
    files: dict[str, str]
    sha256: dict[str, str]


@dataclass
class Resumed:
    at: str
    from_round: int


@dataclass
class WorkerInfo:
    address: str
    describe: pb.DescribeReply = _flattened()


@dataclass
class RunInfo:
    """What every run records, relay or twin: its settings, its workers and how it ended."""

    schema_version: int = SCHEMA_VERSION
    weightrelay_version: str = weightrelay.__version__
    status: str = "running"  # then "complete", "interrupted" or "failed"
    started_at: str = field(default_factory=now)
    finished_at: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    objectives: dict[str, str] = field(default_factory=dict)
    error: str | None = _optional()


@dataclass
class RelayResults:
    run: RunInfo = _flattened(RunInfo)
    swap_pairs: list[tuple[int, int]] = field(default_factory=list)
    initial_sync: InitialSync | None = None
    rounds: list[Round] = field(default_factory=list)
    checkpoint: Checkpoint | None = _optional()
    resumed: list[Resumed] = _optional(factory=list)


# -- a twin run ---------------------------------------------------------------------------
@dataclass
class PerTensor:
    relative_l2: dict[str, float]
    max_abs: dict[str, float]


@dataclass
class Drift:
    """How far two workers' weights are apart: relative L2 ||a - b|| / max(||a||, ||b||) and max |a - b|,
    overall and per tensor, and on how many test samples their predictions differ."""

    relative_l2: float
    max_abs: float
    per_tensor: PerTensor
    differing_predictions: int = 0


@dataclass
class WorkerState:
    accuracy: float
    loss: float
    weights_sha256: str
    confusion_matrix: list[list[int]]


@dataclass
class TwinStep:
    """The workers measured after `step` steps of the shared schedule."""

    step: int
    epoch: float
    pairs: dict[str, Drift]
    workers: dict[str, WorkerState]
    train_seconds: float | None = _optional()


@dataclass
class StepCount:
    per_epoch: int
    total: int


@dataclass
class TwinResults:
    kind: str = "twin"
    run: RunInfo = _flattened(RunInfo)
    checkpoints: list[TwinStep] = field(default_factory=list)
    steps: StepCount | None = _optional()


Results = Union[RelayResults, TwinResults]


# -- the writer, and reading back ---------------------------------------------------------
def to_json(value: Any) -> Any:
    """A record (or a list or mapping of them, a protobuf message, a plain value) as JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("omit") and (item is None or item == []):
                continue
            encoded = to_json(item)
            if f.metadata.get("flatten"):
                out.update(encoded)
            else:
                out[f.metadata.get("key", f.name)] = encoded
        return out
    if isinstance(value, Message):
        return message_to_dict(value)
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def write_results(run_dir: Path, results: Results) -> None:
    """The one writer of results.json: the whole file replaced at once, so a reader never sees half of it."""
    write_json_atomic(run_dir / RESULTS_FILE, to_json(results), indent=1)


def _decode(kind: Any, value: Any) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if value is None or kind is Any:
        return value
    if origin in (Union, types.UnionType):
        return _decode(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [_decode(args[0], item) for item in value]
    if origin is tuple:
        return tuple(_decode(a, item) for a, item in zip(args, value))
    if origin is dict:
        return {key: _decode(args[1], item) for key, item in value.items()}
    if isinstance(kind, type) and issubclass(kind, Message):
        return json_format.ParseDict(value, kind(), ignore_unknown_fields=True)
    if is_dataclass(kind):
        return from_json(kind, value)
    return value


def from_json(kind: type[R], mapping: dict[str, Any]) -> R:
    """A record of type `kind` from its JSON (keys it does not know are left out; missing ones take its defaults)."""
    hints = get_type_hints(kind)
    values = {}
    for f in fields(kind):  # type: ignore[arg-type]
        if f.metadata.get("flatten"):
            values[f.name] = _decode(hints[f.name], mapping)
        elif f.metadata.get("key", f.name) in mapping:
            values[f.name] = _decode(hints[f.name], mapping[f.metadata.get("key", f.name)])
    return kind(**values)
