"""Residual networks and transformers relayed between PyTorch, Keras and JAX by `coordinator run` and `twin`, as a
user runs them (a subprocess, local workers). To keep CI short these train on small generated files in the real
formats (MNIST's and CIFAR-10's) rather than on real MNIST: every evaluation covers the whole test set, and
ResNet-20 over MNIST's 10,000 test images takes minutes on a small CPU in each framework. The runs on real MNIST
with --max-train-samples 2000 (the issue's acceptance) are recorded in the CHANGELOG's entry for this change."""

from __future__ import annotations

import pytest

from coordinator.results import load_results
from tests.e2e.runner import coordinator, results_path
from tests.support import write_cifar10, write_idx_dataset
from tests.unit.test_graphs import RESIDUAL_TOML

pytestmark = pytest.mark.e2e

THREE = ("--local", "--workers", "torch,keras,jax")


def run(command: str, *args: str) -> dict:
    done = coordinator(command, "--no-report", *args)
    assert done.returncode == 0, done.stderr + done.stdout
    return load_results(results_path(done.stdout).parent)


def assert_every_move_exact(results: dict) -> None:
    moves = results["initial_sync"]["moves"] + [m for r in results["rounds"] for m in r["moves"]]
    assert len(moves) == 2 + 3 * len(results["rounds"])
    for move in moves:
        assert move["same_weights"] and move["differing_predictions"] == 0 and move["max_abs_probability_diff"] <= 1e-4, move


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"mnist": write_idx_dataset(root / "mnist", train=400, test=120, seed=5),
            "cifar10": write_cifar10(root / "cifar10", per_batch=80, test=120, seed=6)}


@pytest.mark.parametrize("model", ["resnet20", "vit-tiny"])
def test_a_ring_of_three_frameworks_relays_resnet20_and_vit_tiny_exactly_on_cifar10(tmp_path, data, model):
    """On 3-channel 32x32 inputs (vit-tiny takes patches of 4 there); on MNIST the hand-written residual block and
    the twin run below cover the 1-channel path, and the integration tests both built-ins on both."""
    dataset = "cifar10"
    results = run("run", *THREE, "--model", model, "--dataset", dataset, "--data-dir", str(data[dataset]), "--rounds", "1",
                  "--lr", "0.05", "--max-train-samples", "128", "--out", str(tmp_path))
    assert results["status"] == "complete" and results["config"]["model"] == model
    assert results["workers"]["jax"]["model"]["name"] == model
    if model == "vit-tiny":
        assert "patch conv2d 64@4x4/4 valid [64x8x8]" in results["workers"]["keras"]["architecture"]
    assert_every_move_exact(results)


def test_a_hand_written_residual_block_relays_exactly_and_a_mismatched_add_is_refused_before_anything_runs(tmp_path, data):
    path = tmp_path / "residual.toml"
    path.write_text(RESIDUAL_TOML)
    results = run("run", *THREE, "--model", str(path), "--data-dir", str(data["mnist"]), "--rounds", "1", "--lr", "0.05",
                  "--max-train-samples", "128", "--out", str(tmp_path / "runs"))
    assert_every_move_exact(results)
    assert "add1 add (bn2 + entry) relu" in results["workers"]["keras"]["architecture"]

    bad = tmp_path / "mismatch.toml"
    bad.write_text(RESIDUAL_TOML.replace('filters = 8\npadding = "same"\n[[layers]]\nkind = "batchnorm"\n[[layers]]',
                                         'filters = 4\npadding = "same"\n[[layers]]\nkind = "batchnorm"\n[[layers]]'))
    refused = coordinator("run", *THREE, "--model", str(bad), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2, refused.stderr
    assert "layer 4 (add add1): its inputs disagree in shape: bn2 gives [4, 28, 28], entry gives [8, 28, 28]" in refused.stderr
    assert not (tmp_path / "refused").exists()  # nothing ran: no workers, no run directory


def test_twin_training_of_vit_tiny_across_three_frameworks(tmp_path, data):
    results = run("twin", *THREE, "--model", "vit-tiny", "--epochs", "1", "--every-steps", "2", "--max-train-samples", "128",
                  "--data-dir", str(data["mnist"]), "--out", str(tmp_path))
    checkpoints = results["checkpoints"]
    assert [c["step"] for c in checkpoints][:3] == [0, 1, 2]
    assert set(checkpoints[1]["pairs"]) == {"torch/keras", "torch/jax", "keras/jax"}
    assert all(pair["differing_predictions"] == 0 for pair in checkpoints[0]["pairs"].values())  # the same start computes alike
    for pair in checkpoints[1]["pairs"].values():  # after the first step
        assert 0 < pair["relative_l2"] <= 1e-5, pair["relative_l2"]
        assert "block1_attn.in_proj_weight" in pair["per_tensor"]["relative_l2"]
    same = run("twin", "--local", "--workers", "torch,torch-b", "--model", "vit-tiny", "--epochs", "1", "--every-steps", "2",
               "--max-train-samples", "128", "--data-dir", str(data["mnist"]), "--out", str(tmp_path / "same"))
    for checkpoint in same["checkpoints"]:
        assert checkpoint["pairs"]["torch/torch-b"]["relative_l2"] == 0, checkpoint["step"]
