"""The `coordinator sweep` command: its flags, and where its runs' workers come from."""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import sys
from pathlib import Path

from coordinator import validators
from coordinator.errors import RoundFailed, UsageError
from coordinator.sweep import RUNS_DIR, SWEEP_FILE, Sweep, keep_file
from coordinator.sweep_file import SweepSpec, read_sweep
from coordinator.sweep_progress import Tally, make_view
from coordinator.sweep_results import SWEEP_JSON
from coordinator.sweep_workers import LocalPlacer, Placer

#: Ray reads a loopback address as this machine's outward one unless told that there is no
#: cluster beyond this machine; a cluster on 127.0.0.1 (--ray local, or a test's) needs this.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="many runs: a grid of settings x seeds, summarized with confidence intervals",
        description="Run every point of the sweep file's [grid] (crossed with [base]) with every seed as an ordinary run in "
                    "SWEEP_DIR/runs/, K at a time, each on workers of its own; a run whose workers die starts again on new "
                    "workers from its last checkpoint. Writes SWEEP_DIR/sweep.json (per point: mean, sd and 95%% interval over "
                    "seeds) and SWEEP_DIR/report.html. See docs/sweeps.md.",
    )
    sweep.add_argument("file", nargs="?", type=Path, metavar="FILE.toml", help="the sweep file (not with --resume)")
    sweep.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="run what a sweep has not completed, with its saved sweep file")
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="start each slot's workers as local child processes (the default)")
    where.add_argument("--ray", metavar="ADDRESS",
                       help="place each run's workers as actors on the Ray cluster at ADDRESS ('local': start one on 127.0.0.1); "
                            "needs pip install 'weightrelay[ray]'")
    sweep.add_argument("--parallel", type=_positive, default=1, metavar="K", help="runs at a time, each with its own workers (default 1)")
    sweep.add_argument("--out", type=Path, help="directory that receives SWEEP_DIR (default: [base] out, else runs/)")
    sweep.add_argument("--mlflow", metavar="URI", help="log the sweep to this MLflow tracking server: a parent run with the intervals, "
                                                       "a child run per experiment (default: [base] mlflow)")
    sweep.add_argument("--mlflow-experiment", metavar="NAME", help="the MLflow experiment (default: [base] mlflow_experiment, else weightrelay)")
    output = sweep.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", help="print only where sweep.json and the report are")
    output.add_argument("--json", action="store_true", help="print one JSON object per event on stdout")
    sweep.add_argument("--no-report", action="store_true", help="skip writing SWEEP_DIR/report.html")


def _positive(text: str) -> int:
    try:
        return validators.positive_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _placer(args: argparse.Namespace, spec: SweepSpec) -> tuple[Placer, dict]:
    if not args.ray:
        return LocalPlacer(), {"kind": "local", "parallel": args.parallel}
    if args.ray == "local" or args.ray.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    try:
        from coordinator.ray_workers import RayPlacer
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise UsageError("--ray needs Ray, an optional extra: pip install 'weightrelay[ray]'") from None
    return RayPlacer(args.ray, spec.resources), {"kind": "ray", "address": args.ray, "parallel": args.parallel, "resources": spec.resources}


def sweep_tracking(config, sweep_dir: Path, spec: SweepSpec):
    """The sweep's MLflow parent run, where its settings ask for MLflow; None otherwise."""
    if not config.mlflow:
        return None
    from coordinator.tracking import SweepTracking

    return SweepTracking(config, sweep_dir.name, {"grid": json.dumps(spec.grid, sort_keys=True), "seeds": ",".join(map(str, spec.seeds))})


def command_sweep(args: argparse.Namespace) -> int:
    from coordinator.cli import _new_run_dir

    if bool(args.file) == bool(args.resume):
        raise UsageError("give a sweep file (coordinator sweep FILE.toml) or --resume SWEEP_DIR, not both")
    placed = "ray" if args.ray else "local"
    stdout = sys.stdout  # the sweep's own output (Ray's messages are sent to stderr)
    if args.resume:
        if not (args.resume / SWEEP_FILE).is_file() or not (args.resume / SWEEP_JSON).is_file():
            raise UsageError(f"--resume {args.resume}: no {SWEEP_FILE} and {SWEEP_JSON} there; pass a directory made by 'coordinator sweep'")
        spec = read_sweep(args.resume / SWEEP_FILE, placed)
    else:
        spec = read_sweep(args.file, placed)
    placer, placement = _placer(args, spec)
    if args.resume:
        sweep_dir = args.resume
    else:
        sweep_dir = _new_run_dir(args.out or Path(spec.base.values.get("out", "runs")), prefix="sweep-")
        keep_file(spec, sweep_dir)
    first = spec.settings(spec.points[0], spec.seeds[0]).config
    mlflow = {key: value for key, value in (("mlflow", args.mlflow), ("mlflow_experiment", args.mlflow_experiment)) if value}
    if mlflow:  # every run of the sweep logs there, as if [base] said so
        spec.base.values.update(mlflow)
        first = replace(first, **mlflow)
    trackers = sweep_tracking(first, sweep_dir, spec)  # an unreachable tracking server stops the sweep here
    sweep = Sweep(spec, sweep_dir, placer, placement, view=None, tracking=trackers)
    tally = Tally(len(sweep.jobs), sweep.counts()["complete"], first.rounds if spec.mode == "relay" else 1)
    sweep.view = view = make_view(tally, quiet=args.quiet, as_json=args.json, stream=stdout)
    try:
        status = sweep.run()
        report = None
        if not args.no_report:
            from coordinator.sweep_report import write_sweep_report

            report = str(write_sweep_report(sweep_dir))
        view("sweep_done", {"sweep_dir": str(sweep_dir), "sweep_json": str(sweep_dir / SWEEP_JSON), "report": report,
                            "status": status, "counts": sweep.counts()})
    finally:
        view.close()
        if trackers is not None:
            trackers.finish_sweep(sweep)
    if status != "complete":
        failed = [job for job in sweep.jobs if job.status != "complete"]
        raise RoundFailed(f"{len(failed)} of {len(sweep.jobs)} runs failed ({', '.join(job.name for job in failed)}: "
                          f"{failed[0].errors[-1] if failed[0].errors else 'not run'}); see {sweep_dir / SWEEP_JSON}; "
                          f"`coordinator sweep --resume {sweep_dir}` runs them again (runs under {sweep_dir / RUNS_DIR})")
    return 0
