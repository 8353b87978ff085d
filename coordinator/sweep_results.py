"""What a sweep records: SWEEP_DIR/sweep.json, its schema, and the summaries over seeds in it.

Schema 1: the sweep's settings (`mode`, `base`, `grid`, `seeds`, `retries`, `placement`), its
`status` and `counts`, and per grid point its `settings`, its `runs` (seed, run directory, status,
attempts, errors, the final weights' sha256 per worker, the nodes its workers ran on) and, over
the seeds whose runs completed:

- `metrics`: one row per final-round quantity: each evaluation's accuracy, loss and swap rates
  (`kind` evaluation, `of` its phase), each move's max |dp| and differing predictions (`move`,
  `of` "sender->receiver"); for twin runs the final drift per pair (`drift`, `of` "a/b": relative
  L2, max |dw|, differing predictions) and each worker's final accuracy and loss (`worker`);
- `differences`: per compared pair (`a`, `b`: phases, or workers of a twin run) and metric the
  paired difference a - b within each run.

Every row has `n`, `mean`, `sd`, `ci95` ([low, high], Student's t, None below two seeds) and the
`seeds` and `values` it summarizes. `load_sweep` reads the file; a newer schema is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from coordinator.errors import UsageError
from coordinator.results import RESULTS_FILE, load_results, upgrade
from coordinator.stats import summary

SWEEP_SCHEMA_VERSION = 1
SWEEP_JSON = "sweep.json"
#: Row kinds a difference is taken of: the evaluations of a relay, the workers of a twin run.
DIFFERENCE_KINDS = ("evaluation", "worker")

Values = dict[tuple[str, str, str], float]  # (kind, of, metric) -> value


def final_values(results: dict[str, Any]) -> Values:
    """The final-round (relay) or final-checkpoint (twin) quantities of one run's results."""
    values: Values = {}
    if results.get("kind") == "twin":
        last = results["checkpoints"][-1] if results.get("checkpoints") else None
        if last:
            for pair, drift in last["pairs"].items():
                for metric in ("relative_l2", "max_abs", "differing_predictions"):
                    values[("drift", pair, metric)] = float(drift[metric])
            for name, state in last["workers"].items():
                values[("worker", name, "accuracy")] = float(state["accuracy"])
                values[("worker", name, "loss")] = float(state["loss"])
        return values
    results = upgrade(results)
    if not results.get("rounds"):
        return values
    last = results["rounds"][-1]
    for evaluation in last["evaluations"]:
        phase = evaluation["phase"]
        values[("evaluation", phase, "accuracy")] = float(evaluation["accuracy"])
        values[("evaluation", phase, "loss")] = float(evaluation["loss"])
        for pair, rate in evaluation["swap_rates"].items():
            values[("evaluation", phase, f"swap_rate {pair}")] = float(rate)
    for move in last["moves"]:
        for metric in ("max_abs_probability_diff", "differing_predictions"):
            values[("move", f"{move['from']}->{move['to']}", metric)] = float(move[metric])
    return values


def final_weights(results: dict[str, Any]) -> dict[str, str]:
    """{worker: sha256 of its weights at the end} of one run."""
    if results.get("kind") == "twin":
        last = results["checkpoints"][-1] if results.get("checkpoints") else {"workers": {}}
        return {name: state["weights_sha256"] for name, state in last["workers"].items()}
    if results.get("checkpoint"):
        return dict(results["checkpoint"]["sha256"])
    return {}


def _row(fields: dict[str, Any], seeds: list[int], values: list[float]) -> dict[str, Any]:
    return {**fields, **summary(values), "seeds": seeds, "values": values}


def point_metrics(per_seed: dict[int, Values]) -> list[dict[str, Any]]:
    """One row per quantity the point's completed runs have, over their seeds."""
    keys: list[tuple[str, str, str]] = []
    for values in per_seed.values():
        keys += [key for key in values if key not in keys]
    rows = []
    for kind, of, metric in keys:
        seeds = [s for s, values in per_seed.items() if (kind, of, metric) in values]
        rows.append(_row({"kind": kind, "of": of, "metric": metric}, seeds, [per_seed[s][(kind, of, metric)] for s in seeds]))
    return rows


def point_differences(per_seed: dict[int, Values], pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per pair (a, b) and metric both have: a - b within each run, summarized over the seeds."""
    rows = []
    for a, b in pairs:
        metrics: list[str] = []
        for values in per_seed.values():
            metrics += [m for (kind, of, m) in values if of == a and kind in DIFFERENCE_KINDS and m not in metrics]
        for metric in metrics:
            seeds, diffs = [], []
            for seed, values in per_seed.items():
                found = [(values.get((kind, a, metric)), values.get((kind, b, metric))) for kind in DIFFERENCE_KINDS]
                pair = next(((x, y) for x, y in found if x is not None and y is not None), None)
                if pair:
                    seeds.append(seed)
                    diffs.append(pair[0] - pair[1])
            if seeds:
                rows.append(_row({"a": a, "b": b, "metric": metric}, seeds, diffs))
    return rows


def run_values(run_dir: Path) -> tuple[Values, dict[str, str]] | None:
    """(final quantities, final weights) of a completed run; None for one that is not complete."""
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return None
    results = load_results(run_dir)
    if results.get("status") != "complete":
        return None
    return final_values(results), final_weights(results)


def load_sweep(sweep_dir: Path | str) -> dict[str, Any]:
    """SWEEP_DIR/sweep.json as written (schema 1)."""
    path = Path(sweep_dir) / SWEEP_JSON
    if not path.is_file():
        raise UsageError(f"{sweep_dir} holds no {SWEEP_JSON}; pass a directory made by 'coordinator sweep'")
    document = json.loads(path.read_text())
    if document.get("schema_version", 1) > SWEEP_SCHEMA_VERSION:
        raise UsageError(f"{path} has sweep schema {document['schema_version']}; this coordinator reads up to "
                         f"{SWEEP_SCHEMA_VERSION}: upgrade weightrelay")
    return document

