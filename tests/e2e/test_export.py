"""`coordinator export` of relayed weights, scored outside the system: onnxruntime on the ONNX file, a
freshly built PyTorch model on the state_dict, a freshly built Keras model on the .weights.h5, each against
the workers' own predictions on the whole MNIST test set. Real workers, real gRPC, real MNIST."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from coordinator.export import load_kept
from coordinator.onnx_graph import ONNX_BUILDERS
from weightrelay import codec, models
from weightrelay.data import load_mnist
from tests.e2e.runner import coordinator, results_path
from tests.support import REPO

pytestmark = pytest.mark.e2e
#: The model whose PyTorch and Keras files are checked too: convolutions, batchnorm with its buffers, and a
#: flatten of (C, H, W) before a dense layer: every layout rule between the canonical layout and Keras'.
FRAMEWORK_FILES_ON = "cnn-bn"
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def agree(expected: np.ndarray, probabilities: np.ndarray, what: str) -> None:
    """0 differing predictions and max |dp| <= 1e-5 over the test set."""
    differing = int((expected.argmax(1) != probabilities.argmax(1)).sum())
    largest = float(np.abs(expected.astype(np.float64) - probabilities).max())
    assert differing == 0 and largest <= 1e-5, f"{what}: {differing} predictions differ, max |dp| {largest:.2e}"


def exported(run_dir, fmt: str, worker: str, tmp_path) -> str:
    suffix = {"onnx": ".onnx", "torch": ".pt", "keras": ".weights.h5"}[fmt]
    out = tmp_path / f"{worker}{suffix}"
    done = coordinator("export", str(run_dir), "--worker", worker, "--format", fmt, "--out", str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    assert str(out) in done.stdout and out.stat().st_size > 0
    return str(out)


def in_framework(framework: str, path: str, run_dir, worker: str, data_dir, tmp_path) -> np.ndarray:
    """Probabilities of a freshly built `framework` model that loaded `path` (its own process)."""
    out = tmp_path / f"{framework}-probabilities.npy"
    command = [sys.executable, "-m", "tests.framework_predict", framework, path, str(run_dir), worker, str(data_dir), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def exportable(name: str) -> bool:
    """Whether every layer kind of a built-in has its ONNX function (the others are refused by name: unit tests)."""
    return all(layer.kind in ONNX_BUILDERS for layer in models.resolve(models.builtin(name), (1, 28, 28), 10).layers)


@pytest.mark.parametrize("model", [name for name in sorted(models.BUILTINS) if exportable(name)])
def test_relayed_weights_exported_score_as_the_workers_do(request, tmp_path, data_dir, torch_worker, keras_worker, model):
    if model == "mlp":  # the shared run of the e2e tests relays the default model
        run_dir = request.getfixturevalue("two_round_run")[2]
    else:
        done = coordinator("run", "--rounds", "1", "--model", model, "--lr", "0.05", "--max-train-samples", "2000", "--no-report", "--quiet",
                           "--torch", torch_worker.address, "--keras", keras_worker.address, "--data-dir", str(data_dir),
                           "--out", str(tmp_path / "runs"))
        assert done.returncode == 0, done.stderr + done.stdout
        run_dir = results_path(done.stdout).parent
    kinds = {layer.kind for layer in models.builtin(model).layers}
    if not kinds <= set(ONNX_BUILDERS):  # a kind ONNX export does not have yet: refused, naming it
        refused = coordinator("export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
        assert refused.returncode == 2 and all(kind in refused.stderr for kind in kinds - set(ONNX_BUILDERS)), refused.stderr
        pytest.skip(f"{model}: ONNX export refuses {', '.join(sorted(kinds - set(ONNX_BUILDERS)))} (checked)")

    kept = load_kept(run_dir, "keras", None)
    x = load_mnist(data_dir, download=False).test.x
    worker_probabilities = {}
    for worker in (torch_worker, keras_worker):  # each worker builds the run's model and scores the kept weights itself
        worker.client.initialize(models.to_proto(kept.model.spec))
        worker.client.set_weights(kept.weights)
        reply = worker.client.evaluate(True, True)
        assert reply.weights_sha256 == kept.sha256
        worker_probabilities[worker.name] = codec.from_proto(reply.probabilities)

    path = exported(run_dir, "onnx", "keras", tmp_path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"input": x})
    assert logits.shape == (len(x), 10)
    for name, expected in worker_probabilities.items():
        agree(expected, probabilities, f"onnxruntime vs the {name} worker")

    if model != FRAMEWORK_FILES_ON:
        return
    agree(worker_probabilities["torch"], in_framework("torch", exported(run_dir, "torch", "keras", tmp_path), run_dir, "keras", data_dir, tmp_path),
          "a fresh PyTorch model with the exported state_dict vs the torch worker")
    agree(worker_probabilities["keras"], in_framework("keras", exported(run_dir, "keras", "keras", tmp_path), run_dir, "keras", data_dir, tmp_path),
          "a fresh Keras model with the exported .weights.h5 vs the keras worker")
