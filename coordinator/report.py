"""`coordinator report RUN_DIR`: confusion-matrix heatmaps, curves across rounds, and one
self-contained `report.html` (images embedded) that opens from disk with no network."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # files only; never a display
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from coordinator.results import PHASES, class_label, class_names, load_results  # noqa: E402

REPORT_HTML = "report.html"
FIGURES_DIR = "report"
PHASE_COLOURS = {"torch_trained": "#d62728", "keras_from_torch": "#ff9896", "keras_trained": "#1f77b4", "torch_from_keras": "#aec7e8"}
# A receiver's curve lies on its sender's (same weights, same predictions): dash it so both show.
PHASE_STYLES = {phase: dict(color=PHASE_COLOURS[phase], marker="x" if "_from_" in phase else "o",
                            linestyle="--" if "_from_" in phase else "-", label=phase) for phase in PHASE_COLOURS}
SWAP = (1, 7)


def default_rounds(count: int) -> list[int]:
    """First, middle and last round."""
    return sorted({0, count // 2, count - 1}) if count else []


def parse_rounds(spec: str, count: int) -> list[int]:
    """"default", "all", or a comma list of round indices ("0,5,19")."""
    if spec == "default":
        return default_rounds(count)
    if spec == "all":
        return list(range(count))
    try:
        chosen = sorted({int(part) for part in spec.split(",")})
    except ValueError:
        raise ValueError(f"--rounds {spec!r}: use default, all, or round numbers like 0,5,19") from None
    missing = [r for r in chosen if not 0 <= r < count]
    if missing:
        raise ValueError(f"--rounds {spec!r}: the run has rounds 0-{count - 1}, not {missing}")
    return chosen


def heatmap(evaluation: dict[str, Any], round_index: int, path: Path, names: list[str]) -> None:
    cm = evaluation["confusion_matrix"]
    size = len(cm)
    shares = [[count / max(sum(row), 1) for count in row] for row in cm]  # colour by row share
    figure = Figure(figsize=(6.4, 5.6), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for true in range(size):
        for predicted in range(size):
            axes.text(predicted, true, str(cm[true][predicted]), ha="center", va="center", fontsize=8,
                      color="white" if shares[true][predicted] > 0.5 else "black")
    for true, predicted in (SWAP, SWAP[::-1]):  # the cells that tell which objective the weights carry
        axes.add_patch(Rectangle((predicted - 0.5, true - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=2))
    labels = [class_label(names, i) for i in range(size)]
    axes.set_xticks(range(size), labels, rotation=45 if any(len(label) > 2 for label in labels) else 0, ha="right" if any(len(label) > 2 for label in labels) else "center", fontsize=8)
    axes.set_yticks(range(size), labels, fontsize=8)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title(f"round {round_index} - {evaluation['phase']} - {evaluation['worker']}")
    figure.colorbar(image, ax=axes, label="share of the true label's row")
    figure.tight_layout()
    figure.savefig(path)


def _series(rounds: list[dict], phase: str, key: str) -> list[float]:
    return [next(e[key] for e in r["evaluations"] if e["phase"] == phase) for r in rounds]


def _round_axis(axes) -> None:
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def curves(rounds: list[dict], directory: Path) -> list[Path]:
    xs = [r["round"] for r in rounds]
    paths = []

    figure = Figure(figsize=(10, 4), dpi=100)
    for index, (key, label) in enumerate((("accuracy", "test accuracy"), ("loss", "test loss (true labels)"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for phase, _ in PHASES:
            axes.plot(xs, _series(rounds, phase, key), **PHASE_STYLES[phase])
        axes.set_ylabel(label)
        _round_axis(axes)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle("accuracy and loss across rounds")
    figure.tight_layout()
    paths.append(directory / "accuracy_loss.png")
    figure.savefig(paths[-1])

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for phase, _ in PHASES:
        axes.plot(xs, _series(rounds, phase, "swap_rate"), **PHASE_STYLES[phase])
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("(cm[1][7] + cm[7][1]) / (row 1 + row 7)")
    axes.set_title("1<->7 swap rate across rounds")
    _round_axis(axes)
    axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(directory / "swap_rate.png")
    figure.savefig(paths[-1])

    figure = Figure(figsize=(10, 4), dpi=100)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for move, (sender, receiver) in enumerate((("torch", "keras"), ("keras", "torch"))):
        label = f"{sender} -> {receiver}"
        left.plot(xs, [r["transfers"][move]["differing_predictions"] for r in rounds], marker="o", label=label)
        right.plot(xs, [max(r["transfers"][move]["max_abs_probability_diff"], 1e-12) for r in rounds], marker="o", label=label)
    left.set_ylabel("test samples predicted differently")
    left.set_ylim(bottom=0, top=max(1, *(t["differing_predictions"] for r in rounds for t in r["transfers"])) * 1.1)
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("max |probability difference|")
    right.set_yscale("log")
    for axes in (left, right):
        _round_axis(axes)
        axes.legend(fontsize=8)
    figure.suptitle("cross-framework disagreement on identical weights, at each move")
    figure.tight_layout()
    paths.append(directory / "disagreement.png")
    figure.savefig(paths[-1])
    return paths


def heatmap_path(directory: Path, round_index: int, phase: str) -> Path:
    return directory / f"cm-round{round_index:03d}-{phase}.png"


# -- HTML -----------------------------------------------------------------------------------
def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .evaluation { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.small td, .small th { font-size: 12px; }
"""


def render_html(results: dict[str, Any], run_dir: Path, curve_paths: list[Path], heatmaps: dict[int, list[tuple[dict, Path]]]) -> str:
    config = results["config"]
    rounds = results["rounds"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>weightrelay run {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>weightrelay run {html.escape(run_dir.name)}</h1>",
        f"<p>status <b>{html.escape(results['status'])}</b>; started {html.escape(str(results['started_at']))}, "
        f"finished {html.escape(str(results.get('finished_at')))}; {len(rounds)} of {config['rounds']} rounds.</p>",
    ]
    if results.get("error"):
        parts.append(f"<p><b>error:</b> {html.escape(results['error'])}</p>")
    parts.append("<h2>Configuration</h2>" + _table(("setting", "value"), config.items(), "small"))
    workers = results.get("workers", {})
    names = class_names(results)
    if workers:
        parts.append("<h2>Workers</h2>" + _table(
            ("worker", "address", "framework", "backend", "device", "data set", "dataset fingerprint"),
            [(name, w.get("address"), f"{w.get('framework')} {w.get('framework_version')}", w.get("backend"), w.get("device"),
              w.get("dataset", {}).get("name", "mnist"), w.get("dataset", {}).get("fingerprint", "")[:16]) for name, w in workers.items()], "small"))
        architecture = next((w.get("architecture") for w in workers.values() if w.get("architecture")), "")
        parts.append(f"<p>model: <code>{html.escape(architecture)}</code></p>")
    parts.append("<p>classes: " + ", ".join(html.escape(class_label(names, i)) for i in range(len(names))) + "</p>")
    header = ["round"] + [f"{phase} acc / swap" for phase, _ in PHASES] + ["torch->keras differ", "keras->torch differ", "train s (torch/keras)", "wall s"]
    summary = []
    for r in rounds:
        by_phase = {e["phase"]: e for e in r["evaluations"]}
        summary.append(
            [r["round"]]
            + [f"{by_phase[p]['accuracy']:.4f} / {by_phase[p]['swap_rate']:.3f}" for p, _ in PHASES]
            + [t["differing_predictions"] for t in r["transfers"]]
            + [f"{r['train']['torch']['seconds']:.1f} / {r['train']['keras']['seconds']:.1f}", f"{r['wall_seconds']:.1f}"]
        )
    parts.append("<h2>Summary per round</h2>" + _table(header, summary))
    if curve_paths:
        parts.append("<h2>Curves</h2>" + "".join(f"<p>{_img(p, p.stem)}</p>" for p in curve_paths))
    for round_index, items in heatmaps.items():
        parts.append(f"<h2>Round {round_index}: confusion matrices</h2>")
        for evaluation, path in items:
            per_class = _table(
                ("label", "precision", "recall", "F1", "support"),
                [(class_label(names, c["label"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]) for c in evaluation["per_class"]],
                "small",
            )
            parts.append(
                f"<h3>round {round_index} - {html.escape(evaluation['phase'])} - {html.escape(evaluation['worker'])}: "
                f"accuracy {evaluation['accuracy']:.4f}, swap rate {evaluation['swap_rate']:.3f}</h3>"
                f"<div class='evaluation'><div>{_img(path, path.stem)}</div><div>{per_class}</div></div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path | str, rounds: str = "default") -> Path:
    """Write the figures into RUN_DIR/report/ and RUN_DIR/report.html; return the HTML's path."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    completed = results["rounds"]
    chosen = parse_rounds(rounds, len(completed))
    directory = run_dir / FIGURES_DIR
    directory.mkdir(exist_ok=True)
    curve_paths = curves(completed, directory) if completed else []
    heatmaps: dict[int, list[tuple[dict, Path]]] = {}
    names = class_names(results)
    for round_index in chosen:
        for evaluation in completed[round_index]["evaluations"]:
            path = heatmap_path(directory, round_index, evaluation["phase"])
            heatmap(evaluation, round_index, path, names)
            heatmaps.setdefault(round_index, []).append((evaluation, path))
    target = run_dir / REPORT_HTML
    target.write_text(render_html(results, run_dir, curve_paths, heatmaps))
    return target
