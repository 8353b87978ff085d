"""`coordinator show` and `coordinator compare`: quick looks at run directories in a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.errors import UsageError
from coordinator.results import class_label, class_names, phases_of, upgrade


def default_console() -> Console:
    """The terminal's console; when output is piped, a plain one wide enough for a 10x10 matrix."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


def pick_round(results: dict[str, Any], round_index: int | None, run: str) -> dict[str, Any]:
    rounds = results["rounds"]
    if not rounds:
        raise UsageError(f"{run} has no completed round yet")
    if round_index is None:
        return rounds[-1]
    if not 0 <= round_index < len(rounds):
        raise UsageError(f"{run} has rounds 0-{len(rounds) - 1}, not {round_index}")
    return rounds[round_index]


def confusion_table(evaluation: dict[str, Any], names: list[str]) -> Table:
    cm = evaluation["confusion_matrix"]
    table = Table(title="confusion matrix (rows: true label, columns: predicted)", title_justify="left")
    table.add_column("true", justify="right", style="bold")
    for predicted in range(len(cm)):
        table.add_column(str(predicted), justify="right")  # numbers keep the columns narrow; rows carry the names
    for true, row in enumerate(cm):
        total = max(sum(row), 1)
        cells = []
        for predicted, count in enumerate(row):
            if predicted == true:
                style = "bold green"
            elif count / total >= 0.1:
                style = "bold red"
            elif count:
                style = "yellow"
            else:
                style = "dim"
            cells.append(f"[{style}]{count}[/]")
        table.add_row(class_label(names, true), *cells)
    return table


def per_class_table(evaluation: dict[str, Any], names: list[str]) -> Table:
    table = Table(title="per class", title_justify="left")
    for column in ("label", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="right")
    for c in evaluation["per_class"]:
        table.add_row(class_label(names, c["label"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    return table


def swaps_text(evaluation: dict[str, Any]) -> str:
    rates = evaluation.get("swap_rates") or {"1<->7": evaluation["swap_rate"]}
    return ", ".join(f"swap {pair} {rate:.3f}" for pair, rate in rates.items())


def show(results: dict[str, Any], run: str, round_index: int | None, phase: str | None, console: Console | None = None) -> None:
    console = console or default_console()
    results = upgrade(results)
    item = pick_round(results, round_index, run)
    known = [p for p, _ in phases_of(results)]
    if phase is not None and phase not in known:
        raise UsageError(f"{run} has no phase {phase!r}; its phases are {', '.join(known)}")
    evaluations = [e for e in item["evaluations"] if phase is None or e["phase"] == phase]
    names = class_names(results)
    for evaluation in evaluations:
        console.print(
            f"round {item['round']} - {evaluation['phase']} - {evaluation['worker']}: accuracy {evaluation['accuracy']:.4f}, "
            f"loss {evaluation['loss']:.4f}, {swaps_text(evaluation)}",
            style="bold", highlight=False,
        )
        console.print(confusion_table(evaluation, names))
        console.print(per_class_table(evaluation, names))


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], round_index: int | None, console: Console | None = None) -> None:
    """Per phase: accuracy and swap rate of both runs and B - A, at one round of each (default: each run's last)."""
    console = console or default_console()
    a, b = upgrade(a), upgrade(b)
    rounds = [pick_round(results, round_index, name) for results, name in zip((a, b), names, strict=True)]
    console.print(f"A = {names[0]} (round {rounds[0]['round']}), B = {names[1]} (round {rounds[1]['round']})", highlight=False)
    differing = [key for key in a["config"] if a["config"].get(key) != b["config"].get(key) and key != "out"]
    if differing:
        console.print("settings that differ: " + ", ".join(f"{k}: {a['config'].get(k)} -> {b['config'].get(k)}" for k in differing), highlight=False)
    table = Table()
    for column in ("phase", "accuracy A", "accuracy B", "B - A", "swap A", "swap B", "B - A"):
        table.add_column(column, justify="right" if column != "phase" else "left")
    phases_b = {p for p, _ in phases_of(b)}
    for phase in [p for p, _ in phases_of(a) if p in phases_b]:  # the phases both runs have
        ea, eb = (next(e for e in r["evaluations"] if e["phase"] == phase) for r in rounds)
        table.add_row(
            phase,
            f"{ea['accuracy']:.4f}", f"{eb['accuracy']:.4f}", f"{eb['accuracy'] - ea['accuracy']:+.4f}",
            f"{ea['swap_rate']:.3f}", f"{eb['swap_rate']:.3f}", f"{eb['swap_rate'] - ea['swap_rate']:+.3f}",
        )
    console.print(table)
