"""What `coordinator sweep` shows while it works: runs done, running and failed, with an ETA.

Events (each a dict with `run`, the run's name, where it is about one run): `run_started` (its
attempt, workers and the nodes they run on), `run_round` (a round done), `run_retry` (its
workers died: started again on new ones), `run_done` (complete, failed or interrupted, with the
error), `sweep_done`. Views are called from the runs' threads and serialize themselves.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO


class Tally:
    """Counts of the sweep's runs, and an ETA from the work done so far (rounds, for relay runs)."""

    def __init__(self, total: int, done: int, rounds: int):
        self.total, self.done, self.failed = total, done, 0
        self.rounds = max(rounds, 1)
        self.running: dict[str, float] = {}  # run -> share of it done
        self.started = time.monotonic()
        self.done_here = 0.0  # work done in this process (the ETA's rate)

    def update(self, kind: str, event: dict[str, Any]) -> None:
        run = event.get("run", "")
        if kind == "run_started":
            self.running.setdefault(run, 0.0)
        elif kind == "run_round":
            share = (event["round"] + 1) / self.rounds
            self.done_here += max(share - self.running.get(run, 0.0), 0.0)
            self.running[run] = share
        elif kind == "run_done":
            self.done_here += 1.0 - self.running.pop(run, 0.0)
            if event["status"] == "complete":
                self.done += 1
            else:
                self.failed += 1

    def eta(self) -> float | None:
        """Seconds left at the rate of this process so far; None before any work is done."""
        left = self.total - self.done - self.failed - sum(self.running.values())
        if self.done_here <= 0:
            return None
        return left * (time.monotonic() - self.started) / self.done_here

    def line(self) -> str:
        eta = self.eta()
        tail = f", ETA {eta:.0f} s" if eta is not None else ""
        return f"{self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed{tail}"


def format_event(kind: str, event: dict[str, Any], tally: Tally) -> str | None:
    if kind == "run_started":
        workers = ", ".join(f"{name} {address}" + (f" (node {event['nodes'][name][:12]})" if event["nodes"].get(name, "local") != "local" else "")
                            for name, address in event["workers"].items())
        again = f" (attempt {event['attempt']})" if event["attempt"] > 1 else ""
        return f"{event['run']:<14} started{again}: {event['point']}, seed {event['seed']}; workers {workers}"
    if kind == "run_retry":
        return f"{event['run']:<14} attempt {event['attempt']} failed: {event['error']}; starting it again on new workers"
    if kind == "run_done":
        error = f": {event['error']}" if event.get("error") else ""
        return f"{event['run']:<14} {event['status']} in {event['seconds']:.1f} s{error}  [{tally.line()}]"
    if kind == "sweep_done":
        return f"sweep: {event['sweep_json']}\nreport: {event['report']}" if event.get("report") else f"sweep: {event['sweep_json']}"
    return None


class SweepLines:
    """One plain line per run event: for logs, pipes and CI."""

    def __init__(self, tally: Tally, stream: TextIO | None = None):
        self.tally = tally
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        with self.lock:
            self.tally.update(kind, event)
            self.show(kind, event)

    def show(self, kind: str, event: dict[str, Any]) -> None:
        line = format_event(kind, event, self.tally)
        if line is not None:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class SweepQuiet(SweepLines):
    """Only where sweep.json and the report are."""

    def show(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "sweep_done":
            super().show(kind, event)


class SweepJson(SweepLines):
    """One JSON object per event: {"event": kind, ...}."""

    def show(self, kind: str, event: dict[str, Any]) -> None:
        print(json.dumps({"event": kind, **event}), file=self.stream, flush=True)


class SweepRich(SweepLines):
    """Live view for terminals: the run lines scroll above a bar of the runs with the counts and the ETA."""

    def __init__(self, tally: Tally, stream: TextIO | None = None):
        super().__init__(tally, stream)
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(file=self.stream)
        self.progress = Progress(TextColumn("runs"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self.console)
        self.task = self.progress.add_task(tally.line(), total=tally.total, completed=tally.done)
        self.progress.start()

    def show(self, kind: str, event: dict[str, Any]) -> None:
        finished = self.tally.done + self.tally.failed + sum(self.tally.running.values())
        self.progress.update(self.task, completed=finished, description=self.tally.line())
        line = format_event(kind, event, self.tally)
        if line is not None:
            self.console.print(line, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()


def make_view(tally: Tally, quiet: bool = False, as_json: bool = False, stream: TextIO | None = None) -> SweepLines:
    """The view for the output style, on `stream` (default stdout)."""
    stream = stream or sys.stdout
    if as_json:
        return SweepJson(tally, stream)
    if quiet:
        return SweepQuiet(tally, stream)
    if stream.isatty():
        return SweepRich(tally, stream)
    return SweepLines(tally, stream)
