"""The results file of a run: its schemas, and reading any of them (`coordinator.records` writes it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from coordinator.config import DEFAULT_OBJECTIVES

#: 1: two workers named torch and keras, `transfers` per round, `initial_sync.transfer/evaluation`.
#: 2: any ring of named workers (`order`), `moves` per round, `initial_sync.evaluations/moves`,
#: `objectives`, `swap_pairs` and each evaluation's `swap_rates`. Readers take both (see `upgrade`).
SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"
#: The workers of every schema-1 file (schema 1 knew no others).
DEFAULT_ORDER = ("torch", "keras")


def ring_phases(order: Sequence[str]) -> list[tuple[str, str]]:
    """The evaluations of a round, in order: (phase, worker). For torch, keras: torch_trained,
    keras_from_torch, keras_trained, torch_from_keras."""
    phases = []
    for i, worker in enumerate(order):
        receiver = order[(i + 1) % len(order)]
        phases += [(f"{worker}_trained", worker), (f"{receiver}_from_{worker}", receiver)]
    return phases


#: The four evaluations of a round of the default ring (every schema-1 file has these).
PHASES: tuple[tuple[str, str], ...] = tuple(ring_phases(DEFAULT_ORDER))


def swap_rate(confusion: Sequence[Sequence[int]], a: int = 1, b: int = 7) -> float:
    """Share of true a's and b's predicted as the other: (cm[a][b] + cm[b][a]) / (row a + row b)."""
    total = sum(confusion[a]) + sum(confusion[b])
    return (confusion[a][b] + confusion[b][a]) / total if total else 0.0


def swapped(objectives: Iterable[str]) -> list[tuple[int, int]]:
    """The label pairs the (canonical) objectives swap, in order of appearance."""
    pairs = []
    for text in objectives:
        if text.startswith("swap:"):
            a, b = (int(v) for v in text.removeprefix("swap:").split(","))
            if (a, b) not in pairs:
                pairs.append((a, b))
    return pairs


def swap_pairs(objectives: Iterable[str]) -> list[tuple[int, int]]:
    """The label pairs whose swap rates a run shows: those its objectives swap; where none does,
    those the default workers' objectives swap, (1, 7)."""
    return swapped(objectives) or swapped(DEFAULT_OBJECTIVES.values())


def pair_name(pair: Sequence[int]) -> str:
    return f"{pair[0]}<->{pair[1]}"


def upgrade(results: dict[str, Any]) -> dict[str, Any]:
    """A results dict in schema 2's shape, whichever schema the file has (the file is not changed)."""
    if results.get("schema_version", 1) >= 2:
        return results
    upgraded = dict(results, schema_version=2, upgraded_from=1, order=list(DEFAULT_ORDER), swap_pairs=[[1, 7]])
    upgraded["objectives"] = {"torch": results.get("config", {}).get("torch_objective", "swap:1,7"),
                              "keras": results.get("config", {}).get("keras_objective", "identity")}
    upgraded["rounds"] = [dict(r, moves=r.get("transfers", [])) for r in results.get("rounds", [])]
    for item in upgraded["rounds"]:
        for evaluation in item["evaluations"]:
            evaluation.setdefault("swap_rates", {"1<->7": evaluation["swap_rate"]})
    sync = results.get("initial_sync")
    if sync:
        upgraded["initial_sync"] = {"evaluations": [sync["evaluation"]], "moves": [sync["transfer"]]}
    return upgraded


def phases_of(results: dict[str, Any]) -> list[tuple[str, str]]:
    return ring_phases(upgrade(results)["order"])


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


def load_results(run_dir: Path | str) -> dict[str, Any]:
    """The results file as written (schema 1 or 2); readers that want one shape call `upgrade`."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    return json.loads(path.read_text())
