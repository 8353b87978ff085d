"""The output styles of `coordinator run`, fed the relay's real event shapes."""

import io
import json

from rich.console import Console

from coordinator.progress import JsonPrinter, LinePrinter, QuietPrinter, RichPrinter, round_label

EVALUATION = {"round": 0, "worker": "torch", "phase": "torch_trained", "accuracy": 0.7138, "loss": 2.2637, "swap_rate": 0.9551,
              "confusion_matrix": [[0] * 10] * 10, "per_class": []}
EVENTS = [
    ("step", {"round": 0, "step": "torch: train"}),
    ("train_progress", {"round": 0, "worker": "torch", "epoch": 1, "epochs": 1, "batch": 50, "batches": 938, "loss": 1.5,
                        "accuracy": 0.5, "samples_per_second": 30000.0, "epoch_end": False}),
    ("evaluation", EVALUATION),
    ("round_done", {"round": 0, "rounds": 2, "wall_seconds": 3.0}),
    ("done", {"run_dir": "runs/x", "results": "runs/x/results.json"}),
    ("report", {"path": "runs/x/report.html"}),
]


def feed(printer):
    for kind, event in EVENTS:
        printer(kind, event)
    printer.close()


def test_plain_lines_one_per_phase():
    out = io.StringIO()
    feed(LinePrinter(2, out))
    lines = out.getvalue().splitlines()
    assert lines == [
        f"{round_label(0, 2)}  torch_trained          acc 0.7138  loss 2.2637  swap 1<->7 0.955",
        "results: runs/x/results.json",
        "report: runs/x/report.html",
    ]


def test_quiet_prints_only_where_things_are():
    out = io.StringIO()
    feed(QuietPrinter(2, out))
    assert out.getvalue().splitlines() == ["results: runs/x/results.json", "report: runs/x/report.html"]


def test_json_is_one_object_per_event():
    out = io.StringIO()
    feed(JsonPrinter(out))
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["event"] for o in objects] == [kind for kind, _ in EVENTS]
    assert objects[2]["accuracy"] == 0.7138 and objects[1]["batch"] == 50


def test_live_view_shows_the_phase_lines_and_progress():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    printer = RichPrinter(2, console)
    for kind, event in EVENTS[:2]:
        printer(kind, event)
    task = printer.progress.tasks[printer.step_task]
    assert (task.description, task.completed, task.total) == ("torch: train", 50, 938)
    for kind, event in EVENTS[2:]:
        printer(kind, event)
    printer.close()
    assert printer.progress.tasks[printer.rounds_task].completed == 1
    text = out.getvalue()
    assert "torch_trained          acc 0.7138" in text and "report: runs/x/report.html" in text
