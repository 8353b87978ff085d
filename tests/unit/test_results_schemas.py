"""Results files of schema 1 (two workers, `transfers`) and schema 2 (any ring, `moves`) both read."""

from __future__ import annotations

import copy
import re
import json

import numpy as np
import pytest
from rich.console import Console

from coordinator import report, views
from coordinator.results import PHASES, phases_of, ring_phases, swap_pairs, upgrade

RNG = np.random.default_rng(5)


def evaluation(worker: str, phase: str) -> dict:
    cm = RNG.integers(0, 50, size=(10, 10)).tolist()
    return {
        "worker": worker, "phase": phase, "accuracy": 0.9, "loss": 0.3, "swap_rate": 0.5, "confusion_matrix": cm,
        "per_class": [{"label": i, "precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 100} for i in range(10)],
        "weights_sha256": "ab" * 32, "seconds": 0.1,
    }


def move(a: str, b: str) -> dict:
    return {"from": a, "to": b, "seconds": 0.01, "bytes": 437544, "tensors": 6, "sha256": "ab" * 32, "receiver_phase": f"{b}_from_{a}",
            "same_weights": True, "differing_predictions": 0, "max_abs_probability_diff": 1e-7}


def schema1(rounds: int = 2) -> dict:
    """A results file as the coordinator wrote it before rings and twins (schema 1)."""
    worker = {"address": "127.0.0.1:1", "framework": "torch", "framework_version": "2", "backend": "cpu", "device": "cpu",
              "dataset": {"fingerprint": "f" * 64}}
    return {
        "schema_version": 1, "weightrelay_version": "0.1.0", "status": "complete", "started_at": "x", "finished_at": "y",
        "config": {"rounds": rounds, "torch_objective": "swap:1,7", "keras_objective": "identity", "out": "runs"},
        "workers": {"torch": worker, "keras": dict(worker, framework="keras")},
        "initial_sync": {"transfer": move("torch", "keras"), "evaluation": evaluation("keras", "keras_initial")},
        "rounds": [{"round": r, "evaluations": [evaluation(w, p) for p, w in PHASES], "transfers": [move("torch", "keras"), move("keras", "torch")],
                    "train": {"torch": {"seconds": 1.0}, "keras": {"seconds": 1.0}}, "wall_seconds": 2.0} for r in range(rounds)],
    }


def test_ring_phases_of_the_default_ring_are_the_seed_phases():
    assert ring_phases(["torch", "keras"]) == list(PHASES)
    assert [p for p, _ in ring_phases(["torch", "keras", "jax"])] == [
        "torch_trained", "keras_from_torch", "keras_trained", "jax_from_keras", "jax_trained", "torch_from_jax"]
    assert swap_pairs(["swap:1,7", "identity", "swap:3,8", "swap:1,7"]) == [(1, 7), (3, 8)]
    assert swap_pairs(["identity"]) == [(1, 7)]


def test_a_schema_1_file_upgrades_to_the_schema_2_shape_in_memory():
    original = schema1()
    kept = copy.deepcopy(original)
    upgraded = upgrade(original)
    assert upgraded["order"] == ["torch", "keras"] and upgraded["swap_pairs"] == [[1, 7]] and upgraded["upgraded_from"] == 1
    assert upgrade(upgraded) is upgraded
    assert upgraded["objectives"] == {"torch": "swap:1,7", "keras": "identity"}
    assert [len(r["moves"]) for r in upgraded["rounds"]] == [2, 2]
    assert upgraded["initial_sync"]["moves"][0]["to"] == "keras"
    assert upgraded["rounds"][0]["evaluations"][0]["swap_rates"] == {"1<->7": 0.5}
    assert phases_of(original) == list(PHASES)
    assert original["schema_version"] == 1 and "transfers" in original["rounds"][0] and original["config"] == kept["config"]


def test_show_compare_and_report_read_schema_1(tmp_path):
    console = Console(width=160, record=True)
    views.show(schema1(), "old-run", None, None, console)
    views.compare(schema1(), schema1(3), ("a", "b"), None, console)
    text = console.export_text()
    assert text.count("confusion matrix") == 4 and "swap 1<->7 0.500" in text and "keras_from_torch" in text
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(schema1()))
    page = report.write_report(run_dir).read_text()
    assert "torch_from_keras" in page and "relay ring: torch -&gt; keras -&gt; torch" in page


def test_show_names_the_phases_of_a_ring_it_lacks():
    with pytest.raises(views.UsageError, match="its phases are torch_trained, keras_from_torch"):
        views.show(schema1(), "old-run", None, "jax_trained", Console(record=True))


def configuration_rows(page: str) -> dict[str, str]:
    """The report's configuration table: {setting: value}."""
    table = page.split("<h2>Configuration</h2>", 1)[1].split("</table>", 1)[0]
    return dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", table))


def test_each_report_shows_the_settings_that_applied_to_its_run(tmp_path):
    from coordinator.config import RunConfig

    twin = {"schema_version": 2, "kind": "twin", "status": "complete", "started_at": "x", "finished_at": "y",
            "config": RunConfig(local=True, workers="torch,torch-b", every_steps=50).to_dict(),
            "workers": {}, "order": ["torch", "torch-b"], "objectives": {"torch": "identity", "torch-b": "identity"},
            "checkpoints": [], "steps": {"per_epoch": 938, "total": 938}}
    run_dir = tmp_path / "twin-run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(twin))
    rows = configuration_rows(report.write_report(run_dir).read_text())
    assert rows["every_steps"] == "50" and rows["twin_objective"] == "identity" and rows["workers"] == "torch,torch-b"
    assert rows["epochs"] == "1" and rows["lr"] == "0.01"
    relay_only = {"rounds", "torch", "keras", "torch_objective", "keras_objective", "objective", "order", "via_coordinator"}
    assert not relay_only & set(rows), relay_only & set(rows)
    assert "worker" not in rows  # local workers: no addresses were given

    run_dir = tmp_path / "relay-run"
    run_dir.mkdir()
    relay = schema1()
    relay["config"] = dict(RunConfig(rounds=2).to_dict(), worker=["torch=10.0.0.1:1", "keras=10.0.0.1:2"], torch="10.0.0.1:1")
    (run_dir / "results.json").write_text(json.dumps(relay))
    rows = configuration_rows(report.write_report(run_dir).read_text())
    assert rows["rounds"] == "2" and rows["torch"] == "10.0.0.1:1" and rows["torch_objective"] == "swap:1,7"
    assert not {"every_steps", "twin_objective", "workers", "data_dir"} & set(rows)
    old = tmp_path / "old-run"  # a schema-1 file's settings (its few keys) all applied
    old.mkdir()
    (old / "results.json").write_text(json.dumps(schema1()))
    assert configuration_rows(report.write_report(old).read_text()) == {"rounds": "2", "torch_objective": "swap:1,7",
                                                                         "keras_objective": "identity", "out": "runs"}
