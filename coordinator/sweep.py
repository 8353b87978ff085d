"""`coordinator sweep FILE.toml`: every grid point x seed of a sweep file as an ordinary run, K at a time.

Each run is the run machinery of `coordinator run` (or `twin`): the settings a point x seed
resolves (`coordinator.sweep_file`), saved as its config.toml, run by `Relay` (or `Twin`) into
SWEEP_DIR/runs/pN-seedS/, so `show`, `report`, `compare` and `run --resume` work on it, and its
weights equal those of the same settings run alone. K slots run at a time, each with its own set
of workers (`coordinator.sweep_workers`), which serves one run at a time.

Nothing is lost: a run that fails for any reason but its settings (a worker died, a node was lost,
a deadline passed) is started again on a new set of workers from its last checkpoint, at most
`retries` times, then marked failed with the reason; `--resume SWEEP_DIR` runs only the runs that
are not complete. SWEEP_DIR/sweep.json (`coordinator.sweep_results`) is rewritten after every run.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import weightrelay
from coordinator import config as cfg
from coordinator.errors import CoordinatorError, IncompatibleWorkers, UsageError
from coordinator.records import now
from coordinator.relay import Relay
from coordinator.results import RESULTS_FILE, load_results
from coordinator.stats import CONFIDENCE
from coordinator.sweep_file import SweepSpec, compared
from coordinator.sweep_progress import SweepLines
from coordinator.sweep_results import SWEEP_JSON, SWEEP_SCHEMA_VERSION, Values, load_sweep, point_differences, point_metrics, run_values
from coordinator.sweep_workers import Placer, WorkerSet, set_key
from coordinator.twin import Twin
from weightrelay.files import write_json_atomic

SWEEP_FILE = "sweep.toml"
RUNS_DIR = "runs"
WORKER_LOGS = "workers"
CONFIG_FILE = "config.toml"  # as `coordinator run` names it


@dataclass
class Job:
    """One point x seed, and what became of it."""

    point: Any
    seed: int
    run_dir: Path
    status: str = "pending"  # then "running", "complete", "failed" or "interrupted"
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)
    final: tuple[Values, dict[str, str]] | None = None  # a complete run's final quantities and weights

    def complete(self) -> bool:
        """Whether the run is complete (its final quantities then kept)."""
        self.final = self.final or run_values(self.run_dir)
        self.status = "complete" if self.final is not None else self.status
        return self.final is not None

    @property
    def name(self) -> str:
        return self.run_dir.name


class Sweep:
    def __init__(self, spec: SweepSpec, sweep_dir: Path, placer: Placer, placement: dict[str, Any], view: SweepLines | None,
                 tracking: Any = None):
        self.spec = spec
        self.tracking = tracking  # coordinator.tracking.SweepTracking where the sweep logs to MLflow
        self.sweep_dir = sweep_dir
        self.placer = placer
        self.placement = placement  # {"kind": "local" or "ray", "parallel": K, ...}
        self.placed = placement["kind"]
        self.view = view
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sets: dict[int, WorkerSet] = {}
        self.started_at = now()
        self.status = "running"
        self.jobs = [Job(point, seed, sweep_dir / RUNS_DIR / f"{point.name}-seed{seed}") for point in spec.points for seed in spec.seeds]
        self._earlier(sweep_dir)

    def _earlier(self, sweep_dir: Path) -> None:
        """What an earlier invocation recorded of each run (resuming a sweep): attempts, errors, status."""
        path = sweep_dir / SWEEP_JSON
        if not path.is_file():
            return
        earlier = {run["run_dir"]: run for point in load_sweep(sweep_dir)["points"] for run in point["runs"]}
        for job in self.jobs:
            record = earlier.get(str(job.run_dir.relative_to(sweep_dir)))
            if record:
                job.attempts, job.errors, job.nodes = record["attempts"], list(record["errors"]), dict(record["nodes"])
            job.complete()

    # -- one run ------------------------------------------------------------------------------
    def _config(self, job: Job) -> cfg.RunConfig:
        return replace(self.spec.settings(job.point, job.seed, self.placed).config, out=str(self.sweep_dir / RUNS_DIR))

    def _previous(self, job: Job) -> dict[str, Any] | None:
        """The results of an unfinished relay run to continue from its last checkpoint; None to start it over."""
        path = job.run_dir / RESULTS_FILE
        if self.spec.mode != "relay" or not path.is_file():
            return None
        results = load_results(job.run_dir)
        return results if results.get("rounds") and results.get("checkpoint") else None

    def _attempt(self, job: Job, config: cfg.RunConfig, workers: WorkerSet) -> None:
        if self.placed != "local":  # the run's own workers, wherever they were placed
            config = replace(config, worker=[f"{name}={address}" for name, address in workers.addresses.items()])
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / CONFIG_FILE).write_text(cfg.to_toml(config))
        previous = self._previous(job)

        def on_event(kind: str, event: dict[str, Any]) -> None:
            if kind == "round_done":
                self.view("run_round", {"run": job.name, "round": event["round"]})

        trackers = self.tracking.child(config) if self.tracking is not None else None
        sink = trackers.watching(on_event, job.run_dir, self.spec.mode) if trackers else on_event
        runner = (Relay if self.spec.mode == "relay" else Twin)(config, job.run_dir, sink)
        try:
            runner.run(dict(workers.addresses), previous)
        finally:
            if trackers:
                trackers.finish(job.run_dir)

    def _run(self, slot: int, job: Job, current: tuple[WorkerSet, tuple] | None) -> tuple[WorkerSet, tuple] | None:
        """Run `job` to its end on the slot's workers (new ones after each failure); the workers it leaves."""
        config = self._config(job)
        names, key = config.local_names(), set_key(config.local_names(), config)
        started, tries = time.monotonic(), 0
        while True:
            if self.stopping.is_set():
                job.status = "interrupted"
                break
            tries += 1
            job.attempts += 1
            job.status = "running"
            try:
                if current is not None and (current[1] != key or not current[0].alive()):
                    current[0].stop()
                    current = None
                if current is None:
                    current = (self.placer.start(names, config, self.sweep_dir / WORKER_LOGS / f"slot-{slot}"), key)
                    self.sets[slot] = current[0]
                if self.stopping.is_set():  # stopped while its workers started
                    raise KeyboardInterrupt
                job.nodes = dict(current[0].nodes)
                self.view("run_started", {"run": job.name, "point": job.point.label(), "seed": job.seed, "attempt": job.attempts,
                                          "workers": dict(current[0].addresses), "nodes": job.nodes})
                self._attempt(job, config, current[0])
                if not job.complete():
                    raise CoordinatorError(f"run {job.name} ended without completing; see {job.run_dir / RESULTS_FILE}")
                break
            except KeyboardInterrupt:
                job.status = "interrupted"
                break
            except (UsageError, IncompatibleWorkers) as exc:  # its settings: the same again can only fail again
                job.errors.append(str(exc))
                job.status = "failed"
                break
            except Exception as exc:  # the workers died, a node was lost, a deadline passed: new workers
                job.errors.append(f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc))
                if current is not None:
                    current[0].stop()
                    current = None
                if self.stopping.is_set():
                    job.status = "interrupted"
                    break
                if tries > self.spec.retries:
                    job.status = "failed"
                    break
                self.view("run_retry", {"run": job.name, "attempt": job.attempts, "error": job.errors[-1]})
        self.view("run_done", {"run": job.name, "status": job.status, "seconds": time.monotonic() - started,
                               "error": job.errors[-1] if job.status == "failed" else None})
        self.write()
        return current

    def _slot(self, slot: int, jobs: queue.SimpleQueue) -> None:
        current = None
        try:
            while not self.stopping.is_set():
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                current = self._run(slot, job, current)
        finally:
            if current is not None:
                current[0].stop()

    # -- the whole sweep ----------------------------------------------------------------------
    def run(self) -> str:
        """Every run not complete yet; the sweep's final status ("complete", "failed"), sweep.json written.
        KeyboardInterrupt stops every worker set, records the sweep as interrupted, and is raised again."""
        (self.sweep_dir / RUNS_DIR).mkdir(parents=True, exist_ok=True)
        todo: queue.SimpleQueue = queue.SimpleQueue()
        pending = [job for job in self.jobs if job.status != "complete"]
        for job in pending:
            todo.put(job)
        self.write()
        threads = [threading.Thread(target=self._slot, args=(slot, todo), name=f"sweep-slot-{slot}", daemon=True)
                   for slot in range(min(self.placement["parallel"], len(pending)))]
        try:
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(0.2)
        except BaseException:
            self.stopping.set()
            for workers in list(self.sets.values()):
                workers.stop()
            for thread in threads:
                thread.join(60)
            self.status = "interrupted"
            self.write()
            raise
        finally:
            self.placer.close()
        self.status = "complete" if all(job.status == "complete" for job in self.jobs) else "failed"
        self.write()
        return self.status

    def counts(self) -> dict[str, int]:
        counts = {"runs": len(self.jobs)}
        for status in ("complete", "running", "failed", "interrupted", "pending"):
            counts[status] = sum(job.status == status for job in self.jobs)
        return counts

    def document(self) -> dict[str, Any]:
        """sweep.json (see `coordinator.sweep_results`)."""
        points = []
        for point in self.spec.points:
            runs, per_seed = [], {}
            for job in (j for j in self.jobs if j.point is point):
                done = job.final if job.status == "complete" else None
                if done:
                    per_seed[job.seed] = done[0]
                runs.append({"seed": job.seed, "run_dir": str(job.run_dir.relative_to(self.sweep_dir)), "status": job.status,
                             "attempts": job.attempts, "errors": job.errors, "error": job.errors[-1] if job.status == "failed" else None,
                             "weights_sha256": done[1] if done else {}, "nodes": job.nodes})
            points.append({"name": point.name, "index": point.index, "settings": point.values, "runs": runs,
                           "metrics": point_metrics(per_seed), "differences": point_differences(per_seed, compared(self.spec, point))})
        return {
            "schema_version": SWEEP_SCHEMA_VERSION, "kind": "sweep", "weightrelay_version": weightrelay.__version__,
            "status": self.status, "started_at": self.started_at, "finished_at": None if self.status == "running" else now(),
            "file": SWEEP_FILE, "mode": self.spec.mode, "base": self.spec.base.values, "grid": self.spec.grid, "seeds": self.spec.seeds,
            "retries": self.spec.retries, "placement": self.placement, "confidence": CONFIDENCE, "counts": self.counts(), "points": points,
        }

    def write(self) -> None:
        with self.lock:
            write_json_atomic(self.sweep_dir / SWEEP_JSON, self.document(), indent=1)


def keep_file(spec: SweepSpec, sweep_dir: Path) -> None:
    """The sweep file, copied into SWEEP_DIR (what `--resume SWEEP_DIR` reads back)."""
    shutil.copyfile(spec.path, sweep_dir / SWEEP_FILE)
