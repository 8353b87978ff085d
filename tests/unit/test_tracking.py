"""What the trackers make of a run's events, and TensorBoard's files read back by TensorBoard's own reader
(no server, no workers: the events are the records a relay announces)."""

import logging
import sys
import types

import numpy as np
import pytest

from coordinator import tracking
from coordinator.config import RunConfig
from coordinator.records import Agreement, Evaluation, MoveRecord, to_json

CONFUSION = [[8, 2], [1, 9]]


def evaluation(phase: str, round_index: int | None, accuracy: float) -> dict:
    record = Evaluation("keras", phase, accuracy, 0.7, 0.1, {"1<->7": 0.1, "3<->8": 0.2}, CONFUSION, [], "ab", 0.5)
    return {"round": round_index, **to_json(record)}


def move(round_index: int | None, phase: str) -> dict:
    record = MoveRecord("torch", "keras", "pull", 0.012, 4096, 6, "ab", Agreement(0, 1.5e-7, True), phase)
    return {"round": round_index, **to_json(record)}


def test_an_evaluation_and_a_move_become_scalars_at_their_round():
    assert tracking.scalars_of("evaluation", evaluation("keras_from_torch", 2, 0.9)) == [
        (2, {"keras_from_torch/accuracy": 0.9, "keras_from_torch/loss": 0.7, "keras_from_torch/swap_1_7": 0.1,
             "keras_from_torch/swap_3_8": 0.2})]
    assert tracking.scalars_of("transfer", move(2, "keras_from_torch")) == [
        (2, {"keras_from_torch/differing_predictions": 0, "keras_from_torch/max_abs_dp": 1.5e-7,
             "keras_from_torch/move_bytes": 4096, "keras_from_torch/move_ms": 12.0})]
    assert tracking.scalars_of("transfer", move(None, "keras_initial"))[0][0] == 0  # the initial sync: step 0, phases of its own
    assert tracking.matrices_of("evaluation", evaluation("keras_trained", 1, 0.9)) == [(1, "keras_trained/confusion_matrix", CONFUSION)]
    assert tracking.scalars_of("train_progress", {"round": 0}) == []


def test_a_twin_checkpoint_becomes_drift_per_pair_at_its_step():
    event = {"step": 157, "epoch": 1.0, "pairs": {"torch/keras": {"relative_l2": 1e-6, "max_abs": 2e-6, "differing_predictions": 1,
                                                                  "per_tensor": {}}},
             "workers": {"torch": {"accuracy": 0.9, "loss": 0.3, "weights_sha256": "a", "confusion_matrix": CONFUSION}}}
    (step, values), = tracking.scalars_of("checkpoint", event)
    assert step == 157 and values == {"drift/torch-keras/relative_l2": 1e-6, "drift/torch-keras/max_abs": 2e-6,
                                      "drift/torch-keras/differing_predictions": 1, "torch/accuracy": 0.9, "torch/loss": 0.3}
    assert tracking.matrices_of("checkpoint", event) == [(157, "torch/confusion_matrix", CONFUSION)]


def test_every_setting_is_a_param_and_every_worker_a_tag():
    params = tracking.params_of(RunConfig(worker=["a=127.0.0.1:1", "b=127.0.0.1:2"], data_dir=None))
    assert params["worker"] == "a=127.0.0.1:1,b=127.0.0.1:2" and params["data_dir"] == "" and params["lr"] == str(RunConfig().lr)
    assert set(params) >= {f for f in RunConfig().to_dict()}
    worker = {"address": "127.0.0.1:1", "framework": "keras", "framework_version": "3.15.1", "backend": "tensorflow 2.21.0",
              "device": "cpu:0", "architecture": "mlp: 1x28x28 -> ...", "dataset": {"name": "mnist", "fingerprint": "f" * 64}}
    tags = tracking.start_tags({"run_dir": "/runs/1", "workers": {"keras-b": worker}}, "relay")
    assert tags["worker.keras-b.framework"] == "keras 3.15.1" and tags["worker.keras-b.backend"] == "tensorflow 2.21.0"
    assert tags["model"] == "mlp: 1x28x28 -> ..." and tags["dataset.fingerprint"] == "f" * 64 and tags["results.schema_version"] == "2"


def test_a_confusion_matrix_image_is_each_rows_share_dark_for_many():
    image = tracking.confusion_image([[10, 0], [5, 5]], cell=2)
    assert image.dtype == np.uint8 and image.shape == (4, 4)
    assert image[0, 0] == 0 and image[0, 3] == 255 and image[3, 0] == 128


def test_tensorboard_files_hold_the_scalars_images_and_hparams(tmp_path):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    trackers = tracking.connect(RunConfig(tensorboard=str(tmp_path / "tb"), rounds=2))
    run_dir = tmp_path / "20260101-000000"
    run_dir.mkdir()
    sink = trackers.watching(lambda kind, event: None, run_dir, "relay")
    for r in range(2):
        sink("evaluation", evaluation("torch_trained", r, 0.5 + r / 10))
        sink("transfer", move(r, "keras_from_torch"))
    (run_dir / "results.json").write_text('{"status": "complete"}')
    trackers.finish(run_dir)

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))  # TensorBoard without TensorFlow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / run_dir.name), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("torch_trained/accuracy")] == [(0, 0.5), (1, 0.6)]
    assert [s.value for s in events.Scalars("keras_from_torch/move_ms")] == [12.0, 12.0]
    assert [(i.step, i.width, i.height) for i in events.Images("torch_trained/confusion_matrix")] == [(0, 32, 32), (1, 32, 32)]
    assert b"rounds" in events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert "tensorflow" not in sys.modules


def test_a_failing_tracker_is_dropped_with_one_warning(tmp_path, caplog):
    pytest.importorskip("tensorboardX")
    trackers = tracking.connect(RunConfig(tensorboard=str(tmp_path / "tb")))
    sink = trackers.watching(lambda kind, event: None, tmp_path, "relay")
    trackers.trackers[0].writer.close()
    trackers.trackers[0].writer = None  # as if its files had gone: every call now fails
    with caplog.at_level(logging.WARNING):
        sink("evaluation", evaluation("torch_trained", 0, 0.5))
        sink("evaluation", evaluation("torch_trained", 1, 0.5))
    assert not trackers and len(caplog.records) == 1
    assert "TensorBoard files under" in caplog.text and "the run goes on without logging there" in caplog.text
