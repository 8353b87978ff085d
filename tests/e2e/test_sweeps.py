"""`coordinator sweep` end to end on real MNIST with real local workers: a CI-sized variant of
examples/seed-sweep.toml, interrupted and resumed, each run equal to the same settings run alone."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.results import load_results
from tests.e2e.runner import coordinator, results_path
from tests.support import REPO, ctrl_c_reaches_it

pytestmark = pytest.mark.e2e

#: examples/seed-sweep.toml, made small: 2 rounds, 2 seeds, the first 1,000 training images.
SWEEP = """
seeds = 2
[base]
rounds = 2
max_train_samples = 1000
[grid]
torch_objective = ["swap:1,7", "swap:3,8"]
"""


def every_sha(run_dir: Path) -> list[str]:
    """Every evaluation's weights checksum of a run, in order (the initial sync and each round)."""
    results = load_results(run_dir)
    evaluations = results["initial_sync"]["evaluations"] + [e for r in results["rounds"] for e in r["evaluations"]]
    return [e["weights_sha256"] for e in evaluations]


def test_a_sweep_interrupted_and_resumed_equals_its_runs_run_alone(tmp_path, data_dir):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    process = subprocess.Popen([sys.executable, "-m", "coordinator", "sweep", str(tmp_path / "sweep.toml"), "--local", "--parallel", "2",
                                "--json", "--out", str(tmp_path / "out")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "WEIGHTRELAY_DATA_DIR": str(data_dir)}, preexec_fn=ctrl_c_reaches_it)
    events = []
    for line in process.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "run_done" and events[-1]["status"] == "complete":
            process.send_signal(signal.SIGINT)  # Ctrl-C once the first run is done
            break
    process.wait(120)
    assert process.returncode == 130, process.stderr.read()
    [sweep_dir] = (tmp_path / "out").iterdir()
    interrupted = json.loads((sweep_dir / "sweep.json").read_text())
    assert interrupted["status"] == "interrupted"
    assert 1 <= interrupted["counts"]["complete"] < 4
    assert any(e["event"] == "run_started" for e in events)

    done = coordinator("sweep", "--resume", str(sweep_dir), "--parallel", "2")
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"sweep: {sweep_dir / 'sweep.json'}" in done.stdout and "ETA" in done.stdout
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert sweep["status"] == "complete" and sweep["counts"] == {"runs": 4, "complete": 4, "running": 0, "failed": 0, "interrupted": 0, "pending": 0}
    assert [p["settings"] for p in sweep["points"]] == [{"torch_objective": "swap:1,7"}, {"torch_objective": "swap:3,8"}]

    for point in sweep["points"]:
        pair = point["settings"]["torch_objective"].removeprefix("swap:").replace(",", "<->")
        runs = [sweep_dir / r["run_dir"] for r in point["runs"]]
        assert [r["seed"] for r in point["runs"]] == [0, 1]
        # every row summarizes the runs' own final-round values
        finals = [load_results(run)["rounds"][-1] for run in runs]
        row = next(r for r in point["metrics"] if (r["kind"], r["of"], r["metric"]) == ("evaluation", "torch_trained", f"swap_rate {pair}"))
        values = [next(e for e in f["evaluations"] if e["phase"] == "torch_trained")["swap_rates"][pair] for f in finals]
        assert row["values"] == values and row["n"] == 2 and math.isclose(row["mean"], sum(values) / 2)
        assert row["ci95"][0] <= row["mean"] <= row["ci95"][1]
        moves = next(r for r in point["metrics"] if (r["kind"], r["of"], r["metric"]) == ("move", "torch->keras", "max_abs_probability_diff"))
        assert moves["values"] == [f["moves"][0]["max_abs_probability_diff"] for f in finals]
        difference = next(r for r in point["differences"] if r["metric"] == f"swap_rate {pair}")
        assert (difference["a"], difference["b"]) == ("torch_trained", "keras_trained")
        trained = {phase: [next(e for e in f["evaluations"] if e["phase"] == phase)["swap_rates"][pair] for f in finals]
                   for phase in ("torch_trained", "keras_trained")}
        assert difference["values"] == pytest.approx([a - b for a, b in zip(trained["torch_trained"], trained["keras_trained"])])
        for run, record in zip(runs, point["runs"]):
            assert record["weights_sha256"] == load_results(run)["checkpoint"]["sha256"]

    report = (sweep_dir / "report.html").read_text()
    assert "95% interval" in report and report.count("data:image/png;base64,") >= 4 and "swap:3,8" in report

    # a run the interruption cut short (else the last, on workers that served a run before) equals the same settings run alone
    resumed = [sweep_dir / r["run_dir"] for p in sweep["points"] for r in p["runs"] if load_results(sweep_dir / r["run_dir"]).get("resumed")]
    run_dir = (resumed or [sweep_dir / "runs/p1-seed1"])[0]
    objective, seed = sweep["points"][int(run_dir.name[1])]["settings"]["torch_objective"], run_dir.name.rsplit("seed", 1)[1]
    alone = coordinator("run", "--local", "--rounds", "2", "--max-train-samples", "1000", "--torch-objective", objective, "--seed", seed,
                        "--quiet", "--no-report", "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    assert every_sha(results_path(alone.stdout).parent) == every_sha(run_dir), run_dir.name
