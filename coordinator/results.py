"""The results file of a run: what it holds, and writing it so a reader never sees half of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from google.protobuf import json_format

from weightrelay.v1 import worker_pb2 as pb

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"

#: The four evaluations of a round, in order: (phase, worker).
PHASES: tuple[tuple[str, str], ...] = (
    ("torch_trained", "torch"),
    ("keras_from_torch", "keras"),
    ("keras_trained", "keras"),
    ("torch_from_keras", "torch"),
)


def swap_rate(confusion: Sequence[Sequence[int]], a: int = 1, b: int = 7) -> float:
    """Share of true a's and b's predicted as the other: (cm[a][b] + cm[b][a]) / (row a + row b)."""
    total = sum(confusion[a]) + sum(confusion[b])
    return (confusion[a][b] + confusion[b][a]) / total if total else 0.0


def class_names(results: dict[str, Any]) -> list[str]:
    """Names of the classes, label i first: from the workers' data set; files from before data sets
    had names (and any worker without them) give the labels as numbers."""
    for worker in results.get("workers", {}).values():
        names = worker.get("dataset", {}).get("class_names")
        if names:
            return list(names)
    rounds = results.get("rounds") or []
    size = len(rounds[0]["evaluations"][0]["confusion_matrix"]) if rounds else 10
    return [str(i) for i in range(size)]


def class_label(names: Sequence[str], index: int) -> str:
    """"3" for digits, "3 cat" where the class has a name of its own."""
    name = names[index] if index < len(names) else str(index)
    return name if name == str(index) else f"{index} {name}"


def message_to_dict(message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def evaluation_record(worker: str, phase: str, reply: pb.EvaluateReply) -> dict[str, Any]:
    confusion = [list(row.counts) for row in reply.confusion_matrix]
    return {
        "worker": worker,
        "phase": phase,
        "accuracy": reply.accuracy,
        "loss": reply.loss,
        "swap_rate": swap_rate(confusion),
        "confusion_matrix": confusion,
        "per_class": [
            {"label": c.label, "precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}
            for c in reply.per_class
        ],
        "weights_sha256": reply.weights_sha256,
        "seconds": reply.seconds,
    }


def load_results(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    return json.loads(path.read_text())
