"""SWEEP_DIR/report.html: one self-contained page (images embedded) with every point's summaries
over seeds, the paired differences, and error-bar plots (mean and 95% interval per grid point)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from coordinator.report import STYLE, _img, _table  # also sets matplotlib up for files only
from coordinator.sweep_results import load_sweep
from matplotlib.figure import Figure

REPORT_HTML = "report.html"
FIGURES_DIR = "report"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _interval(row: dict[str, Any]) -> str:
    return f"[{_number(row['ci95'][0])}, {_number(row['ci95'][1])}]" if row.get("ci95") else "-"


def _error_bars(groups: dict[str, list[tuple[str, dict[str, Any]]]], title: str, path: Path) -> Path:
    """One series per grid point over the categories `groups` names: the mean, and the 95% interval as error bars."""
    categories = list(groups)
    points = list(dict.fromkeys(label for rows in groups.values() for label, _ in rows))
    figure = Figure(figsize=(max(6.4, 1.2 * len(categories) + 2), 4.2), dpi=100)
    axes = figure.add_subplot()
    width = 0.8 / max(len(points), 1)
    for p, label in enumerate(points):
        xs, means, low, high = [], [], [], []
        for c, category in enumerate(categories):
            row = next((r for name, r in groups[category] if name == label), None)
            if row is None or row["mean"] is None:
                continue
            xs.append(c - 0.4 + width * (p + 0.5))
            means.append(row["mean"])
            low.append(row["mean"] - row["ci95"][0] if row.get("ci95") else 0.0)
            high.append(row["ci95"][1] - row["mean"] if row.get("ci95") else 0.0)
        axes.errorbar(xs, means, yerr=[low, high], fmt="o", capsize=4, label=label)
    axes.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 3 else 0, ha="right" if len(categories) > 3 else "center")
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _plots(sweep: dict[str, Any], directory: Path) -> list[tuple[str, Path]]:
    """One plot per (kind, metric) of the points' rows, and one per metric of the differences."""
    by_metric: dict[tuple[str, str], dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    for point in sweep["points"]:
        label = f"{point['name']}: " + ", ".join(f"{k}={v}" for k, v in point["settings"].items())
        for row in point["metrics"]:
            by_metric.setdefault((row["kind"], row["metric"]), {}).setdefault(row["of"], []).append((label, row))
        for row in point["differences"]:
            by_metric.setdefault(("difference", row["metric"]), {}).setdefault(f"{row['a']} - {row['b']}", []).append((label, row))
    plots = []
    for i, ((kind, metric), groups) in enumerate(by_metric.items()):
        title = f"{kind} {metric}: mean and 95% interval over seeds"
        plots.append((title, _error_bars(groups, title, directory / f"sweep-{i:02d}.png")))
    return plots


def render_sweep_html(sweep: dict[str, Any], sweep_dir: Path, plots: list[tuple[str, Path]]) -> str:
    counts = sweep["counts"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>weightrelay sweep {html.escape(sweep_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>weightrelay sweep {html.escape(sweep_dir.name)}</h1>",
        f"<p>status <b>{html.escape(sweep['status'])}</b> ({sweep['mode']}); {counts['complete']} of {counts['runs']} runs complete, "
        f"{counts['failed']} failed; seeds {', '.join(map(str, sweep['seeds']))}; intervals: Student's t, {sweep['confidence']:.0%}.</p>",
        "<h2>Settings</h2>" + _table(("setting", "value"), [*((f"base {k}", v) for k, v in sweep["base"].items()),
                                                          *((f"grid {k}", ", ".join(map(str, v))) for k, v in sweep["grid"].items())], "small"),
    ]
    for point in sweep["points"]:
        label = ", ".join(f"{k}={v}" for k, v in point["settings"].items())
        parts.append(f"<h2>{html.escape(point['name'])}: {html.escape(label)}</h2>")
        parts.append(_table(("run", "seed", "status", "attempts", "error"),
                            [(r["run_dir"], r["seed"], r["status"], r["attempts"], r.get("error") or "") for r in point["runs"]], "small"))
        parts.append(_table(("of", "metric", "n", "mean", "sd", "95% interval"),
                            [(f"{r['kind']} {r['of']}", r["metric"], r["n"], _number(r["mean"]), _number(r["sd"]), _interval(r))
                             for r in point["metrics"]], "small"))
        if point["differences"]:
            parts.append("<h3>Paired differences (within each run, over seeds)</h3>")
            parts.append(_table(("a - b", "metric", "n", "mean", "sd", "95% interval"),
                                [(f"{r['a']} - {r['b']}", r["metric"], r["n"], _number(r["mean"]), _number(r["sd"]), _interval(r))
                                 for r in point["differences"]], "small"))
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<div>{_img(path, title)}</div>" for title, path in plots]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_sweep_report(sweep_dir: Path | str) -> Path:
    """Write SWEEP_DIR/report.html from SWEEP_DIR/sweep.json (the PNGs it embeds stay in SWEEP_DIR/report/)."""
    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    directory = sweep_dir / FIGURES_DIR
    directory.mkdir(exist_ok=True)
    path = sweep_dir / REPORT_HTML
    path.write_text(render_sweep_html(sweep, sweep_dir, _plots(sweep, directory)))
    return path
