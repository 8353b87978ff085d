"""Clean, reproducible runs on any model and data set: real workers, real gRPC, real MNIST
(and generated files in the real formats of the data sets that cannot be downloaded here)."""

from __future__ import annotations

import pytest

from coordinator.results import load_results
from tests.e2e.runner import coordinator, results_path
from tests.support import write_cifar10, write_idx_dataset

pytestmark = pytest.mark.e2e


def run(*args: str) -> dict:
    done = coordinator("run", "--no-report", *args)
    assert done.returncode == 0, done.stderr + done.stdout
    return load_results(results_path(done.stdout).parent)


def checksums(results: dict) -> list[str]:
    """Every evaluation's weights checksum, in order (the initial ones too)."""
    initial = [e["weights_sha256"] for e in results["initial_sync"]["evaluations"]]
    return initial + [e["weights_sha256"] for r in results["rounds"] for e in r["evaluations"]]


def test_runs_against_long_lived_workers_repeat_exactly_and_equal_a_local_run(tmp_path, data_dir, torch_worker, keras_worker):
    flags = ["--rounds", "2", "--max-train-samples", "6000", "--out", str(tmp_path), "--data-dir", str(data_dir)]
    workers = ["--torch", torch_worker.address, "--keras", keras_worker.address]
    first = run(*flags, *workers)
    second = run(*flags, *workers)  # the workers now hold the first run's final weights
    local = run(*flags, "--local")
    assert len(checksums(first)) == 10 and len(set(checksums(first))) > 1
    assert checksums(first) == checksums(second) == checksums(local)
    matrices = [[e["confusion_matrix"] for r in results["rounds"] for e in r["evaluations"]] for results in (first, second, local)]
    assert matrices[0] == matrices[1] == matrices[2]
    assert first["rounds"][0]["evaluations"][0]["accuracy"] == local["rounds"][0]["evaluations"][0]["accuracy"]


@pytest.mark.parametrize("model", ["lenet", "cnn-bn", "mlp:512,256,128"])
def test_each_framework_carries_its_objective_on_other_models(tmp_path, data_dir, model):
    results = run("--local", "--rounds", "2", "--model", model, "--lr", "0.05", "--max-train-samples", "10000",
                  "--data-dir", str(data_dir), "--out", str(tmp_path))
    assert results["config"]["model"] == model
    assert results["workers"]["torch"]["model"]["name"] == results["workers"]["keras"]["model"]["name"]
    moves = results["initial_sync"]["moves"] + [t for r in results["rounds"] for t in r["moves"]]
    assert all(m["differing_predictions"] == 0 and m["max_abs_probability_diff"] <= 1e-5 and m["same_weights"] for m in moves)
    for item in results["rounds"]:
        by_phase = {e["phase"]: e for e in item["evaluations"]}
        assert by_phase["torch_trained"]["swap_rate"] > 0.8, (item["round"], by_phase["torch_trained"]["swap_rate"])
        assert by_phase["keras_trained"]["swap_rate"] < 0.1, (item["round"], by_phase["keras_trained"]["swap_rate"])


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_other_data_sets_end_to_end_with_class_names(tmp_path, dataset):
    if dataset == "cifar10":
        data = write_cifar10(tmp_path / "data" / dataset, per_batch=120, test=100, seed=1, archive=True)
        first, label = "airplane", "3 cat"
    else:
        data = write_idx_dataset(tmp_path / "data" / dataset, train=600, test=100, seed=1)
        first, label = "T-shirt/top", "7 Sneaker"
    model = "lenet" if dataset == "cifar10" else "mlp"
    results = run("--local", "--rounds", "1", "--dataset", dataset, "--data-dir", str(data), "--model", model,
                  "--lr", "0.05", "--out", str(tmp_path / "runs"))
    assert results["status"] == "complete" and results["config"]["dataset"] == dataset
    names = results["workers"]["torch"]["dataset"]["class_names"]
    assert names[0] == first and results["workers"]["keras"]["dataset"]["class_names"] == names
    for evaluation in results["rounds"][0]["evaluations"]:
        assert sum(map(sum, evaluation["confusion_matrix"])) == 100
    moves = results["rounds"][0]["moves"]
    assert all(m["differing_predictions"] == 0 and m["max_abs_probability_diff"] <= 1e-5 for m in moves)

    run_dir = next((tmp_path / "runs").iterdir())
    shown = coordinator("show", str(run_dir), "--phase", "torch_trained")
    assert shown.returncode == 0, shown.stderr
    assert label in shown.stdout and f"0 {first}" in shown.stdout
    reported = coordinator("report", str(run_dir))
    assert reported.returncode == 0, reported.stderr
    page = (run_dir / "report.html").read_text()
    assert f"0 {first}" in page.replace("&#x27;", "'").replace("&amp;", "&") and dataset in page
