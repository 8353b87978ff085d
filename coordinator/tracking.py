"""A run's numbers where researchers already look, while it runs: MLflow (`--mlflow URI`) and
TensorBoard (`--tensorboard DIR`).

One interface, `Tracking`: it takes the run's events (the same ones the printer gets, see
coordinator.progress) and hands each tracker what they mean: the settings as params once, the
workers as tags at `start`, and per step (a relay's round; a twin run's training step) scalars
named `PHASE/accuracy`, `PHASE/loss`, `PHASE/swap_A_B` for every evaluation, `PHASE/differing_predictions`,
`PHASE/max_abs_dp`, `PHASE/move_bytes`, `PHASE/move_ms` for the move into the receiver's phase,
`WORKER_train/loss|accuracy`, and `drift/A-B/relative_l2|max_abs|differing_predictions` at each twin
checkpoint; confusion matrices go along as matrices. At the end each tracker gets the run
directory (its files as artifacts) and how the run ended.

Trackers are optional extras, imported only when asked for: the coordinator's default install
imports neither MLflow nor TensorBoard. A tracking server that cannot be reached at the start stops
the run before anything trains (exit 3, naming it); one that fails later costs a warning and the
rest of that run's logging there, never the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from coordinator.config import RunConfig
from coordinator.errors import CoordinatorError, UsageError
from coordinator.results import RESULTS_FILE, SCHEMA_VERSION, load_results

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "weightrelay"
#: results.json's status -> MLflow's run status
MLFLOW_STATUS = {"complete": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
#: The run directory's files that go to the tracker as artifacts (those that exist); its figures too.
ARTIFACTS = (RESULTS_FILE, "config.toml", "report.html")
FIGURES_DIR = "report"  # coordinator.report writes its PNGs there


class TrackingUnreachable(CoordinatorError):
    """The tracking server named by --mlflow does not answer at the start: nothing has trained yet."""

    exit_code = 3


Scalars = dict[str, float]


class Tracker(Protocol):
    """One place the numbers go. Each method may raise: `Tracking` then warns and drops the tracker."""

    what: str  # how warnings name it, e.g. "MLflow at http://..."

    def begin(self, run_name: str, params: dict[str, str], tags: dict[str, str]) -> None: ...

    def tags(self, tags: dict[str, str]) -> None: ...

    def scalars(self, step: int, values: Scalars) -> None: ...

    def matrix(self, step: int, tag: str, counts: list[list[int]]) -> None: ...

    def finish(self, run_dir: Path, status: str) -> None: ...


# -- what the events mean, for every tracker -------------------------------------------------------
def _name(text: str) -> str:
    """A metric or tag name every tracker takes: letters, digits, _ - . / (others become _)."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", text)


def params_of(config: RunConfig) -> dict[str, str]:
    """Every setting as text (a list comma-separated, an unset one empty)."""
    values = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        values[key] = "" if value is None else str(value)
    return values


def start_tags(event: dict[str, Any], kind: str) -> dict[str, str]:
    """Each worker's framework and version, backend, device and address; the model; the data set and its
    fingerprint; the results schema."""
    tags = {"weightrelay.kind": kind, "results.schema_version": str(SCHEMA_VERSION), "run_dir": event["run_dir"]}
    for name, info in event["workers"].items():
        prefix = f"worker.{_name(name)}"
        tags[f"{prefix}.framework"] = f"{info.get('framework', '')} {info.get('framework_version', '')}".strip()
        tags[f"{prefix}.backend"] = info.get("backend", "")
        tags[f"{prefix}.device"] = info.get("device", "")
        tags[f"{prefix}.address"] = info.get("address", "")
        tags.setdefault("model", info.get("architecture", ""))
        dataset = info.get("dataset", {})
        tags.setdefault("dataset", dataset.get("name", ""))
        tags.setdefault("dataset.fingerprint", dataset.get("fingerprint", ""))
    return tags


def step_of(event: dict[str, Any]) -> int:
    """A relay event's step: its round (an initial-sync event, before round 0: 0, under phases of its own)."""
    return int(event.get("round") or 0)


def scalars_of(kind: str, event: dict[str, Any]) -> list[tuple[int, Scalars]]:
    """The scalars an event carries, by step."""
    if kind == "evaluation":
        phase = _name(event["phase"])
        values = {f"{phase}/accuracy": event["accuracy"], f"{phase}/loss": event["loss"]}
        rates = event.get("swap_rates") or {"1<->7": event["swap_rate"]}
        values.update({f"{phase}/swap_{_name(pair.replace('<->', '_'))}": rate for pair, rate in rates.items()})
        return [(step_of(event), values)]
    if kind == "transfer":
        phase = _name(event["receiver_phase"])
        return [(step_of(event), {f"{phase}/differing_predictions": event["differing_predictions"],
                                  f"{phase}/max_abs_dp": event["max_abs_probability_diff"],
                                  f"{phase}/move_bytes": event["bytes"], f"{phase}/move_ms": event["seconds"] * 1000})]
    if kind == "train_done":
        worker = _name(event["worker"])
        return [(step_of(event), {f"{worker}_train/loss": event["loss"], f"{worker}_train/accuracy": event["accuracy"]})]
    if kind == "round_done":
        return [(step_of(event), {"round/wall_seconds": event["wall_seconds"]})]
    if kind == "checkpoint":
        values: Scalars = {}
        for pair, drift in event["pairs"].items():
            name = "drift/" + _name(pair.replace("/", "-"))
            values.update({f"{name}/relative_l2": drift["relative_l2"], f"{name}/max_abs": drift["max_abs"],
                           f"{name}/differing_predictions": drift["differing_predictions"]})
        for worker, state in event["workers"].items():
            values.update({f"{_name(worker)}/accuracy": state["accuracy"], f"{_name(worker)}/loss": state["loss"]})
        return [(int(event["step"]), values)]
    return []


def matrices_of(kind: str, event: dict[str, Any]) -> list[tuple[int, str, list[list[int]]]]:
    """The confusion matrices an event carries: (step, tag, counts)."""
    if kind == "evaluation":
        return [(step_of(event), f"{_name(event['phase'])}/confusion_matrix", event["confusion_matrix"])]
    if kind == "checkpoint":
        return [(int(event["step"]), f"{_name(worker)}/confusion_matrix", state["confusion_matrix"]) for worker, state in event["workers"].items()]
    return []


def final_status(run_dir: Path) -> str:
    """How the run ended, as results.json says (complete, failed, interrupted); failed where it has none."""
    try:
        return load_results(run_dir).get("status", "failed")
    except (OSError, ValueError):
        return "failed"


# -- the trackers ------------------------------------------------------------------------------------
def _missing(flag: str, extra: str, exc: ModuleNotFoundError) -> UsageError:
    return UsageError(f"{flag} needs the package {exc.name}: pip install 'weightrelay[{extra}]'")


class MlflowTracker:
    """One MLflow run per experiment run, through MlflowClient (no global state), logged as events come."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str | None = None):
        # The client's defaults retry an unreachable server for minutes; here a dead server is found out
        # at once (the start refuses it, later it costs one warning). Set these yourself to choose otherwise.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            from mlflow.tracking import MlflowClient
        except ModuleNotFoundError as exc:
            raise _missing("--mlflow", "mlflow", exc) from None
        self.what = f"MLflow at {uri}"
        self.parent_run_id = parent_run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = ""
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except Exception as exc:  # the client raises its own and requests' errors alike
            raise TrackingUnreachable(f"--mlflow {uri}: the tracking server does not answer ({_first_line(exc)}); "
                                      "start it, or fix the URI (nothing has run yet)") from None

    def begin(self, run_name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.entities import Param

        tags = dict(tags, **({"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}))
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])

    def scalars(self, step: int, values: Scalars) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), stamp, step) for key, value in values.items()])

    def matrix(self, step: int, tag: str, counts: list[list[int]]) -> None:
        pass  # in MLflow the report's figures (artifacts) show them

    def finish(self, run_dir: Path, status: str) -> None:
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / FIGURES_DIR).is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / FIGURES_DIR), "figures")
        with contextlib.redirect_stdout(sys.stderr):  # the client prints the run's link: stdout is the run's own (--json)
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


def confusion_image(counts: list[list[int]], cell: int = 16) -> np.ndarray:
    """A confusion matrix as a grey image (H, W uint8): each row's share per predicted class, dark = many,
    `cell` pixels a square."""
    matrix = np.asarray(counts, dtype=np.float64)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    grey = (255 * (1 - shares)).round().astype(np.uint8)
    return np.kron(grey, np.ones((cell, cell), dtype=np.uint8))


class TensorBoardTracker:
    """Event files under DIR/<run name>/, written by tensorboardX (no TensorFlow): the scalars, the confusion
    matrices as images, the settings as hparams (with each accuracy's last value as its metrics) and the
    workers as text."""

    def __init__(self, directory: str):
        try:
            import tensorboardX  # noqa: F401
        except ModuleNotFoundError as exc:
            raise _missing("--tensorboard", "tensorboard", exc) from None
        self.what = f"TensorBoard files under {directory}"
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--tensorboard {directory}: cannot create it: {exc.strerror}") from None
        self.writer: Any = None
        self.params: dict[str, str] = {}
        self.last: Scalars = {}

    def begin(self, run_name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(self.directory / run_name))
        self.params = params

    def tags(self, tags: dict[str, str]) -> None:
        table = "\n".join(["| tag | value |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in tags.items())])
        self.writer.add_text("run/tags", table, 0)

    def scalars(self, step: int, values: Scalars) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        self.last.update(values)
        self.writer.flush()  # a live view: TensorBoard reads what is on disk

    def matrix(self, step: int, tag: str, counts: list[list[int]]) -> None:
        self.writer.add_image(tag, confusion_image(counts), step, dataformats="HW")

    def finish(self, run_dir: Path, status: str) -> None:
        from tensorboardX.summary import hparams

        metrics = {tag: value for tag, value in self.last.items() if tag.endswith("/accuracy")}
        for summary in hparams({**self.params, "status": status}, metrics):  # the experiment, the session start, its end
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# -- the one interface the run calls -------------------------------------------------------------

class Tracking:
    """The trackers of one run. `watching(printer, run_dir, kind)` gives the run's event sink (the printer,
    then every tracker); `finish(run_dir)` ends each tracker's run with the run directory's files and
    status. A tracker that fails is warned about once and dropped."""

    def __init__(self, config: RunConfig, trackers: list[Tracker]):
        self.config = config
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker's failure costs its logging, never the run
                log.warning("%s failed: %s; the run goes on without logging there", tracker.what, _first_line(exc))
                self.trackers.remove(tracker)

    def begin(self, run_name: str, kind: str) -> None:
        params = params_of(self.config)
        self._each(lambda t: t.begin(run_name, params, {"weightrelay.kind": kind}))

    def event(self, kind: str, payload: dict[str, Any], run_kind: str) -> None:
        if kind == "start":
            tags = start_tags(payload, run_kind)
            self._each(lambda t: t.tags(tags))
        for step, values in scalars_of(kind, payload):
            self._each(lambda t: t.scalars(step, values))
        for step, tag, counts in matrices_of(kind, payload):
            self._each(lambda t: t.matrix(step, tag, counts))

    def watching(self, printer: Any, run_dir: Path, run_kind: str) -> Any:
        """The event sink of a run: the printer's, then the trackers' (begun now, under the run directory's name)."""
        if not self.trackers:
            return printer
        self.begin(run_dir.name, run_kind)
        return _Watched(printer, self, run_kind)

    def finish(self, run_dir: Path) -> None:
        status = final_status(run_dir)
        self._each(lambda t: t.finish(run_dir, status))


class _Watched:
    """A printer whose events the trackers see too (after the printer: a slow tracker never hides a line)."""

    def __init__(self, printer: Any, tracking: Tracking, run_kind: str):
        self.printer, self.tracking, self.run_kind = printer, tracking, run_kind

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        self.printer(kind, event)
        self.tracking.event(kind, event, self.run_kind)

    def close(self) -> None:
        self.printer.close()


class SweepTracking:
    """A sweep in MLflow: one parent run (the sweep's settings as params, its intervals as metrics) whose
    children are its experiments' runs, each made by `child(config)`. Without --mlflow it does nothing."""

    def __init__(self, config: RunConfig, name: str, params: dict[str, str] | None = None):
        self.config = config
        self.parent = MlflowTracker(config.mlflow, config.mlflow_experiment or DEFAULT_EXPERIMENT) if config.mlflow else None
        self.parent_run = Tracking(config, [self.parent] if self.parent else [])
        self.parent_run._each(lambda t: t.begin(name, {**params_of(config), **(params or {})}, {"weightrelay.kind": "sweep"}))

    @property
    def run_id(self) -> str | None:
        return self.parent.run_id if self.parent and self.parent_run.trackers else None

    def child(self, config: RunConfig) -> Tracking:
        """The trackers of one experiment of the sweep (its settings): its MLflow run is the parent's child."""
        return connect(config, self.run_id)

    def intervals(self, values: Scalars, step: int = 0) -> None:
        """The sweep's summary numbers (e.g. each setting's interval bounds) as the parent's metrics."""
        self.parent_run._each(lambda t: t.scalars(step, values))

    def finish(self, sweep_dir: Path, status: str) -> None:
        """End the parent run with `status` (complete, failed, interrupted) and `sweep_dir`'s files (those of
        ARTIFACTS it holds, and its figures) as artifacts."""
        self.parent_run._each(lambda t: t.finish(sweep_dir, status))

    def finish_sweep(self, sweep: Any) -> None:
        """A sweep's end (coordinator.sweep.Sweep): each point's intervals as the parent's metrics, named
        POINT/KIND/OF/METRIC/{mean,low,high}, then the parent ended with the sweep's status."""
        values: Scalars = {}
        for point in sweep.document()["points"]:
            rows = [(f"{r['kind']}/{r['of']}/{r['metric']}", r) for r in point["metrics"]]
            rows += [(f"{r['a']}-minus-{r['b']}/{r['metric']}", r) for r in point["differences"]]
            for name, row in rows:
                name = _name(f"{point['name']}/{name}".replace("<->", "_"))
                if row.get("mean") is not None:
                    values[f"{name}/mean"] = row["mean"]
                if row.get("ci95"):
                    values[f"{name}/low"], values[f"{name}/high"] = row["ci95"]
        if values:
            self.intervals(values)
        self.finish(sweep.sweep_dir, sweep.status)


def connect(config: RunConfig, parent_run_id: str | None = None) -> Tracking:
    """The trackers the settings ask for, each checked now: a missing package is a usage error (exit 2), a
    tracking server that does not answer is TrackingUnreachable (exit 3). With `parent_run_id`, the MLflow
    run is that run's child (a sweep's)."""
    trackers: list[Tracker] = []
    if config.mlflow:
        trackers.append(MlflowTracker(config.mlflow, config.mlflow_experiment or DEFAULT_EXPERIMENT, parent_run_id))
    if config.tensorboard:
        trackers.append(TensorBoardTracker(config.tensorboard))
    return Tracking(config, trackers)
