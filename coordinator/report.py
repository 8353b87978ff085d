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

from coordinator.config import applied  # noqa: E402
from coordinator.results import class_label, class_names, load_results, pair_name, phases_of, upgrade  # noqa: E402

REPORT_HTML = "report.html"
FIGURES_DIR = "report"
#: Colour pairs (trained, received) per worker of the ring, in ring order: torch red, keras blue, then others.
WORKER_COLOURS = (("#d62728", "#ff9896"), ("#1f77b4", "#aec7e8"), ("#2ca02c", "#98df8a"), ("#9467bd", "#c5b0d5"),
                  ("#ff7f0e", "#ffbb78"), ("#8c564b", "#c49c94"))


def phase_styles(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Plot style per phase. A receiver's curve lies on its sender's (same weights, same predictions):
    dash it, in the sender's light colour, so both show."""
    order = results["order"]
    styles = {}
    for phase, worker in phases_of(results):
        sender = worker if phase.endswith("_trained") else phase.rsplit("_from_", 1)[1]
        dark, light = WORKER_COLOURS[order.index(sender) % len(WORKER_COLOURS)]
        received = "_from_" in phase
        styles[phase] = dict(color=light if received else dark, marker="x" if received else "o", linestyle="--" if received else "-", label=phase)
    return styles


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


def heatmap(evaluation: dict[str, Any], round_index: int, path: Path, names: list[str], pairs: list[list[int]]) -> None:
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
    for a, b in pairs:  # the cells that tell which objective the weights carry
        for true, predicted in ((a, b), (b, a)):
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


def curves(results: dict[str, Any], directory: Path) -> list[Path]:
    rounds = results["rounds"]
    xs = [r["round"] for r in rounds]
    phases = [p for p, _ in phases_of(results)]
    styles = phase_styles(results)
    paths = []

    figure = Figure(figsize=(10, 4), dpi=100)
    for index, (key, label) in enumerate((("accuracy", "test accuracy"), ("loss", "test loss (true labels)"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for phase in phases:
            axes.plot(xs, _series(rounds, phase, key), **styles[phase])
        axes.set_ylabel(label)
        _round_axis(axes)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle("accuracy and loss across rounds")
    figure.tight_layout()
    paths.append(directory / "accuracy_loss.png")
    figure.savefig(paths[-1])

    pairs = [pair_name(p) for p in results["swap_pairs"]]
    figure = Figure(figsize=(7 * len(pairs), 4), dpi=100)
    for index, pair in enumerate(pairs):
        axes = figure.add_subplot(1, len(pairs), index + 1)
        for phase in phases:
            axes.plot(xs, [next(e for e in r["evaluations"] if e["phase"] == phase)["swap_rates"][pair] for r in rounds], **styles[phase])
        axes.set_ylim(-0.02, 1.02)
        a, b = pair.split("<->")
        axes.set_ylabel(f"(cm[{a}][{b}] + cm[{b}][{a}]) / (row {a} + row {b})")
        axes.set_title(f"{pair} swap rate across rounds")
        _round_axis(axes)
        axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(directory / "swap_rate.png")
    figure.savefig(paths[-1])

    figure = Figure(figsize=(10, 4), dpi=100)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for move, first in enumerate(rounds[0]["moves"]):
        label = f"{first['from']} -> {first['to']}"
        left.plot(xs, [r["moves"][move]["differing_predictions"] for r in rounds], marker="o", label=label)
        right.plot(xs, [max(r["moves"][move]["max_abs_probability_diff"], 1e-12) for r in rounds], marker="o", label=label)
    left.set_ylabel("test samples predicted differently")
    left.set_ylim(bottom=0, top=max(1, *(t["differing_predictions"] for r in rounds for t in r["moves"])) * 1.1)
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
    results = upgrade(results)
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
    parts.append("<h2>Configuration</h2>" + _table(("setting", "value"), applied(config, "relay", results["order"]).items(), "small"))
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
    order = results["order"]
    phases = [p for p, _ in phases_of(results)]
    moves = [f"{m['from']}->{m['to']} differ" for m in rounds[0]["moves"]] if rounds else []
    header = ["round"] + [f"{phase} acc / swap" for phase in phases] + moves + [f"train s ({'/'.join(order)})", "wall s"]
    parts.append(f"<p>relay ring: {html.escape(' -> '.join(order + order[:1]))}; objectives: "
                 + html.escape(", ".join(f"{n} {o}" for n, o in results["objectives"].items())) + "</p>")
    summary = []
    for r in rounds:
        by_phase = {e["phase"]: e for e in r["evaluations"]}
        summary.append(
            [r["round"]]
            + [f"{by_phase[p]['accuracy']:.4f} / " + " ".join(f"{v:.3f}" for v in by_phase[p]["swap_rates"].values()) for p in phases]
            + [t["differing_predictions"] for t in r["moves"]]
            + ["/".join(f"{r['train'][n]['seconds']:.1f}" for n in order), f"{r['wall_seconds']:.1f}"]
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
                f"accuracy {evaluation['accuracy']:.4f}, "
                + html.escape(", ".join(f"swap rate {pair} {rate:.3f}" for pair, rate in evaluation["swap_rates"].items())) + "</h3>"
                f"<div class='evaluation'><div>{_img(path, path.stem)}</div><div>{per_class}</div></div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path | str, rounds: str = "default") -> Path:
    """Write the figures into RUN_DIR/report/ and RUN_DIR/report.html; return the HTML's path."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    if results.get("kind") == "twin":
        return write_twin_report(run_dir, results)
    results = upgrade(results)
    completed = results["rounds"]
    chosen = parse_rounds(rounds, len(completed))
    directory = run_dir / FIGURES_DIR
    directory.mkdir(exist_ok=True)
    curve_paths = curves(results, directory) if completed else []
    heatmaps: dict[int, list[tuple[dict, Path]]] = {}
    names = class_names(results)
    for round_index in chosen:
        for evaluation in completed[round_index]["evaluations"]:
            path = heatmap_path(directory, round_index, evaluation["phase"])
            heatmap(evaluation, round_index, path, names, results["swap_pairs"])
            heatmaps.setdefault(round_index, []).append((evaluation, path))
    target = run_dir / REPORT_HTML
    target.write_text(render_html(results, run_dir, curve_paths, heatmaps))
    return target


# -- twin training ------------------------------------------------------------------------
FLOOR = 1e-12  # zero distances (same framework, same data) drawn at the floor of the log axis


def twin_curves(results: dict[str, Any], directory: Path) -> list[Path]:
    checkpoints = results["checkpoints"]
    steps = [c["step"] for c in checkpoints]
    pairs = list(checkpoints[0]["pairs"]) if checkpoints else []
    paths = []
    figure = Figure(figsize=(12, 4), dpi=100)
    for index, (key, label) in enumerate((("relative_l2", "relative L2 distance ||a - b|| / max(||a||, ||b||)"),
                                          ("max_abs", "max |a - b| over all weights"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for pair in pairs:
            axes.plot(steps, [max(c["pairs"][pair][key], FLOOR) for c in checkpoints], marker="o", label=pair)
        axes.set_yscale("log")
        axes.set_xlabel("training step")
        axes.set_ylabel(label, fontsize=8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"weight drift between frameworks on identical batches (0 drawn at {FLOOR:g})")
    figure.tight_layout()
    paths.append(directory / "drift.png")
    figure.savefig(paths[-1])

    figure = Figure(figsize=(12, 4), dpi=100)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for pair in pairs:
        left.plot(steps, [c["pairs"][pair]["differing_predictions"] for c in checkpoints], marker="o", label=pair)
    for name in results["order"]:
        right.plot(steps, [c["workers"][name]["accuracy"] for c in checkpoints], marker="o", label=name)
    left.set_ylabel("test samples predicted differently")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("test accuracy")
    for axes in (left, right):
        axes.set_xlabel("training step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("prediction disagreement and accuracy along the same schedule")
    figure.tight_layout()
    paths.append(directory / "twin_predictions.png")
    figure.savefig(paths[-1])
    return paths


def render_twin_html(results: dict[str, Any], run_dir: Path, curve_paths: list[Path]) -> str:
    checkpoints = results["checkpoints"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>weightrelay twin run {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>weightrelay twin run {html.escape(run_dir.name)}</h1>",
        f"<p>status <b>{html.escape(results['status'])}</b>; workers {html.escape(', '.join(results['order']))} trained the same "
        f"{results.get('steps', {}).get('total', '?')} steps from the same weights; {len(checkpoints)} checkpoints.</p>",
    ]
    if results.get("error"):
        parts.append(f"<p><b>error:</b> {html.escape(results['error'])}</p>")
    parts.append("<h2>Configuration</h2>" + _table(("setting", "value"), applied(results["config"], "twin", results["order"]).items(), "small"))
    workers = results.get("workers", {})
    parts.append("<h2>Workers</h2>" + _table(
        ("worker", "address", "framework", "backend", "device"),
        [(name, w.get("address"), f"{w.get('framework')} {w.get('framework_version')}", w.get("backend"), w.get("device")) for name, w in workers.items()],
        "small"))
    if curve_paths:
        parts.append("<h2>Drift</h2>" + "".join(f"<p>{_img(p, p.stem)}</p>" for p in curve_paths))
    pairs = list(checkpoints[0]["pairs"]) if checkpoints else []
    rows = [[c["step"], f"{c['epoch']:.2f}"] + [f"{c['pairs'][p]['relative_l2']:.3e} / {c['pairs'][p]['max_abs']:.3e} / {c['pairs'][p]['differing_predictions']}"
                                               for p in pairs] + [f"{c['workers'][n]['accuracy']:.4f}" for n in results["order"]] for c in checkpoints]
    parts.append("<h2>Checkpoints</h2><p>per pair: relative L2 / max |dw| / differing test predictions</p>"
                 + _table(["step", "epoch"] + pairs + [f"{n} acc" for n in results["order"]], rows, "small"))
    if checkpoints:
        last = checkpoints[-1]
        tensors = list(next(iter(last["pairs"].values()))["per_tensor"]["relative_l2"]) if pairs else []
        rows = [[t] + [f"{last['pairs'][p]['per_tensor']['relative_l2'][t]:.3e} / {last['pairs'][p]['per_tensor']['max_abs'][t]:.3e}" for p in pairs]
                for t in tensors]
        parts.append(f"<h2>Per tensor at step {last['step']}</h2>" + _table(["tensor"] + pairs, rows, "small"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_twin_report(run_dir: Path, results: dict[str, Any]) -> Path:
    directory = run_dir / FIGURES_DIR
    directory.mkdir(exist_ok=True)
    curve_paths = twin_curves(results, directory) if results["checkpoints"] else []
    target = run_dir / REPORT_HTML
    target.write_text(render_twin_html(results, run_dir, curve_paths))
    return target
