"""What `coordinator run` shows while it works: one sink per output style, fed the relay's events.

Events: `start`, `step` (the phase that begins), `train_progress`, `train_done`, `evaluation`,
`transfer`, `round_done`, `done`, `report`. Each sink is a callable `(kind, payload)` with a
`close()` that must run whatever happens.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


def round_label(round_index: int | None, rounds: int) -> str:
    """'round   0 (1/20)' for a round, 'initial' before round 0 (rounds are 0-based)."""
    if round_index is None:
        return f"{'initial':<16}"
    return f"{f'round {round_index:>3} ({round_index + 1}/{rounds})':<16}"


def format_event(kind: str, event: dict[str, Any], rounds: int) -> str | None:
    """The plain line for an event, or None for events that have no line."""
    where = round_label(event.get("round"), rounds)
    if kind == "start":
        workers = [f"{name} worker {info['address']}: {info['framework']} {info['framework_version']} on {info['device']}" for name, info in event["workers"].items()]
        return "\n".join(workers + [f"run directory: {event['run_dir']}"])
    if kind == "train_done":
        return (f"{where}  {event['worker']:<5} trained          loss {event['loss']:.4f}  train-acc {event['accuracy']:.4f}  "
                f"({event['seconds']:.1f} s, objective {event['objective']})")
    if kind == "evaluation":
        rates = event.get("swap_rates") or {"1<->7": event["swap_rate"]}
        swaps = "  ".join(f"{pair} {rate:.3f}" for pair, rate in rates.items())
        return f"{where}  {event['phase']:<22} acc {event['accuracy']:.4f}  loss {event['loss']:.4f}  swap {swaps}"
    if kind == "transfer":
        return (f"{where}  moved {event['from']}->{event['to']} {event['bytes']} B in {event['seconds'] * 1000:.0f} ms: "
                f"{event['differing_predictions']} predictions differ, max |dp| {event['max_abs_probability_diff']:.2e}")
    if kind == "checkpoint":
        pairs = "  ".join(f"{pair} rel-L2 {p['relative_l2']:.2e} max|dw| {p['max_abs']:.2e} differ {p['differing_predictions']}"
                          for pair, p in event["pairs"].items())
        accuracies = " ".join(f"{name} {w['accuracy']:.4f}" for name, w in event["workers"].items())
        at = f"step {event['step']:>6} (epoch {event['epoch']:.2f})"
        return f"{at:<26}{pairs}  acc {accuracies}"
    if kind == "done":
        return f"results: {event['results']}"
    if kind == "report":
        return f"report: {event['path']}"
    return None


class LinePrinter:
    """One plain line per phase: for logs, pipes and CI."""

    def __init__(self, rounds: int, stream: TextIO | None = None):
        self.rounds = rounds
        self.stream = stream or sys.stdout

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        line = format_event(kind, event, self.rounds)
        if line is not None:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class QuietPrinter(LinePrinter):
    """Only where the results and the report are."""

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        if kind in ("done", "report"):
            super().__call__(kind, event)


class JsonPrinter:
    """One JSON object per event on stdout, for scripts: {"event": kind, ...payload}."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        print(json.dumps({"event": kind, **event}), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichPrinter:
    """Live view for terminals: the phase lines scroll above a rounds bar with ETA and the
    current phase with its epoch/batch progress, streamed from the worker's Train."""

    def __init__(self, rounds: int, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.rounds = rounds
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console,
        )
        self.rounds_task = self.progress.add_task("rounds", total=rounds, info="")
        self.step_task = self.progress.add_task("starting workers", total=None, info="")
        self.progress.start()

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "step":
            self.progress.reset(self.step_task, total=None, description=event["step"], info="")
        elif kind == "train_progress":
            total = event["batches"] * event["epochs"]
            done = (event["epoch"] - 1) * event["batches"] + event["batch"]
            info = f"epoch {event['epoch']}/{event['epochs']} loss {event['loss']:.3f} acc {event['accuracy']:.3f} {event['samples_per_second']:,.0f}/s"
            self.progress.update(self.step_task, total=total, completed=done, info=info)
        elif kind == "round_done":
            self.progress.update(self.rounds_task, completed=event["round"] + 1)
        line = format_event(kind, event, self.rounds)
        if line is not None:
            self.console.print(line, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()


def make_printer(rounds: int, quiet: bool = False, as_json: bool = False):
    if as_json:
        return JsonPrinter()
    if quiet:
        return QuietPrinter(rounds)
    if sys.stdout.isatty():
        return RichPrinter(rounds)
    return LinePrinter(rounds)
