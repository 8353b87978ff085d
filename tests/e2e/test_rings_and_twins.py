"""Beyond two: a JAX worker in a relay ring of three, and twin training that measures drift.
Real worker processes (torch, keras, jax), real gRPC, real MNIST."""

from __future__ import annotations

import pytest

from coordinator.results import load_results
from tests.e2e.runner import coordinator, results_path

pytestmark = pytest.mark.e2e


def run(command: str, *args: str) -> tuple[dict, str]:
    done = coordinator(command, *args)
    assert done.returncode == 0, done.stderr + done.stdout
    return load_results(results_path(done.stdout).parent), done.stdout


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_a_ring_of_three_frameworks_each_carrying_its_objective(tmp_path, data_dir, model):
    results, stdout = run("run", "--local", "--workers", "torch,keras,jax", "--objective", "jax=swap:3,8", "--rounds", "2",
                          "--lr", "0.05", "--max-train-samples", "10000", "--model", model, "--data-dir", str(data_dir),
                          "--out", str(tmp_path), "--no-report")
    assert results["schema_version"] == 2 and results["order"] == ["torch", "keras", "jax"]
    assert results["objectives"] == {"torch": "swap:1,7", "keras": "identity", "jax": "swap:3,8"}
    assert results["swap_pairs"] == [[1, 7], [3, 8]]
    moves = results["initial_sync"]["moves"] + [m for r in results["rounds"] for m in r["moves"]]
    assert len(moves) == 2 + 2 * 3
    assert all(m["differing_predictions"] == 0 and m["max_abs_probability_diff"] <= 1e-5 and m["same_weights"] for m in moves)
    for item in results["rounds"]:
        assert [(m["from"], m["to"]) for m in item["moves"]] == [("torch", "keras"), ("keras", "jax"), ("jax", "torch")]
        rates = {e["phase"]: e["swap_rates"] for e in item["evaluations"]}
        # each worker's own objective shows after it trains; what the previous worker taught fades
        assert rates["torch_trained"]["1<->7"] > 0.8 and rates["torch_trained"]["3<->8"] < 0.3
        assert rates["keras_trained"]["1<->7"] < 0.1 and rates["keras_trained"]["3<->8"] < 0.1
        assert rates["jax_trained"]["3<->8"] > 0.8 and rates["jax_trained"]["1<->7"] < 0.3
    assert "jax_from_keras" in stdout and "swap 1<->7" in stdout and "3<->8" in stdout


def test_twin_training_on_one_framework_does_not_drift(tmp_path, data_dir):
    results, _ = run("twin", "--local", "--workers", "torch,torch-b", "--epochs", "2", "--max-train-samples", "10000",
                     "--data-dir", str(data_dir), "--out", str(tmp_path), "--no-report")
    steps = [c["step"] for c in results["checkpoints"]]
    assert steps == [0, 1, 157, 314]
    for checkpoint in results["checkpoints"]:
        pair = checkpoint["pairs"]["torch/torch-b"]
        assert pair["relative_l2"] == 0 and pair["max_abs"] == 0 and pair["differing_predictions"] == 0
        assert checkpoint["workers"]["torch"]["weights_sha256"] == checkpoint["workers"]["torch-b"]["weights_sha256"]
    assert results["checkpoints"][-1]["workers"]["torch"]["accuracy"] > 0.8


def test_twin_training_across_three_frameworks_measures_their_drift(tmp_path, data_dir):
    results, stdout = run("twin", "--local", "--workers", "torch,keras,jax", "--epochs", "2", "--every-steps", "100",
                          "--max-train-samples", "10000", "--data-dir", str(data_dir), "--out", str(tmp_path))
    checkpoints = results["checkpoints"]
    assert [c["step"] for c in checkpoints] == [0, 1, 100, 157, 200, 300, 314]
    assert set(checkpoints[1]["pairs"]) == {"torch/keras", "torch/jax", "keras/jax"}
    for pair in checkpoints[1]["pairs"].values():  # after the first step
        assert 0 < pair["relative_l2"] < 1e-5
        assert set(pair["per_tensor"]["relative_l2"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}
    for pair in checkpoints[-1]["pairs"]:
        assert checkpoints[-1]["pairs"][pair]["relative_l2"] < 1e-4  # drift stays small on identical batches
    accuracies = {name: w["accuracy"] for name, w in checkpoints[-1]["workers"].items()}
    assert min(accuracies.values()) > 0.8 and max(accuracies.values()) - min(accuracies.values()) < 0.01
    run_dir = results_path(stdout).parent
    page = (run_dir / "report.html").read_text()
    assert "Drift" in page and "drift.png" not in page  # images are embedded
    settings = page.split("<h2>Configuration</h2>", 1)[1].split("</table>", 1)[0]  # the settings that applied to a twin run
    assert "<td>every_steps</td><td>100</td>" in settings and "<td>rounds</td>" not in settings and "torch_objective" not in settings
    assert (run_dir / "report" / "drift.png").is_file() and (run_dir / "report" / "twin_predictions.png").is_file()
