"""What every relay run must show, wherever its workers run (local processes or containers)."""

from __future__ import annotations

import numpy as np

from coordinator.results import PHASES

WEIGHT_BYTES = 4 * (784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10)


def assert_results_shape(results: dict, rounds: int) -> None:
    """`rounds` rounds of four evaluations in order, full confusion matrices, both moves recorded."""
    assert results["schema_version"] == 2 and results["status"] == "complete"
    assert results["order"] == ["torch", "keras"] and results["objectives"] == {"torch": "swap:1,7", "keras": "identity"}
    assert results["config"]["rounds"] == rounds
    assert set(results["workers"]) == {"torch", "keras"}
    assert results["workers"]["torch"]["dataset"]["fingerprint"] == results["workers"]["keras"]["dataset"]["fingerprint"]
    assert [r["round"] for r in results["rounds"]] == list(range(rounds))
    for item in results["rounds"]:
        assert [(e["phase"], e["worker"]) for e in item["evaluations"]] == list(PHASES)
        for evaluation in item["evaluations"]:
            cm = np.array(evaluation["confusion_matrix"])
            assert cm.shape == (10, 10) and cm.sum() == 10000
            assert len(evaluation["per_class"]) == 10
        assert [(t["from"], t["to"]) for t in item["moves"]] == [("torch", "keras"), ("keras", "torch")]
        assert all(t["bytes"] == WEIGHT_BYTES and t["same_weights"] for t in item["moves"])
        assert set(item["train"]) == {"torch", "keras"} and item["wall_seconds"] > 0
    assert [e["phase"] for e in results["initial_sync"]["evaluations"]] == ["torch_initial", "keras_initial"]
    assert [m["same_weights"] for m in results["initial_sync"]["moves"]] == [True]


def assert_objectives_carried(results: dict) -> None:
    """PyTorch's weights carry the 1<->7 swap, Keras' the true labels; a move changes at most 10 predictions."""
    for item in results["rounds"]:
        by_phase = {e["phase"]: e for e in item["evaluations"]}
        assert by_phase["torch_trained"]["swap_rate"] > 0.8
        assert by_phase["keras_trained"]["swap_rate"] < 0.1
        to_keras, to_torch = item["moves"]
        assert to_keras["differing_predictions"] <= 10 and to_torch["differing_predictions"] <= 10
        # the receiver's confusion matrix is the sender's, up to those few samples
        sent, received = np.array(by_phase["torch_trained"]["confusion_matrix"]), np.array(by_phase["keras_from_torch"]["confusion_matrix"])
        assert np.abs(sent - received).sum() <= 2 * to_keras["differing_predictions"]
