"""`coordinator export` without workers: the ONNX graph of every kind against the numpy reference forward
pass (scored by onnxruntime, on real images), refusals that name what is wrong, the hand-off to a framework's
exporter, and a run directory's kept weights out as ONNX and safetensors."""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from coordinator import checkpoint
from coordinator.errors import UsageError
from coordinator.export import export, load_kept
from coordinator.records import message_to_dict
from tests.support import REPO
from tests.unit.test_layout import digit_images, random_weights
from weightrelay import codec, handoff, models, reference
from weightrelay.models import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ModelSpec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from coordinator import onnx_graph  # noqa: E402  (needs onnx)

#: Every kind and option the ONNX functions spell: asymmetric SAME padding with a stride, each activation,
#: batchnorm over channels and over features, dropout, a flatten of (C, H, W).
EVERY_OPTION = ModelSpec("every-option", (
    Conv2D(4, 4, stride=2, padding="same", activation="tanh"), BatchNorm(activation="relu"), MaxPool2D(2, 1),
    Conv2D(6, 3, activation="sigmoid"), Flatten(), Dense(12), BatchNorm(eps=1e-3, activation="relu"), Dropout(0.5), Dense(0),
))


def scored(model: models.ResolvedModel, weights, x) -> tuple[np.ndarray, np.ndarray]:
    proto = onnx_graph.build(model, weights, {"weightrelay.worker": "torch"})
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(session.run(["logits", "probabilities"], {"input": x.astype(np.float32)}))


@pytest.mark.parametrize("spec", [models.builtin("lenet"), models.builtin("cnn-bn"), models.builtin("mlp:32,16"), EVERY_OPTION],
                         ids=lambda s: s.name)
def test_the_onnx_graph_computes_what_the_reference_does(spec):
    x = digit_images(channels=3)
    model = models.resolve(spec, x.shape[1:], 10)
    weights = random_weights(model)
    logits, probabilities = scored(model, weights, x)
    expected = reference.forward(model, weights, x)
    assert np.abs(logits - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    softmax = np.exp(expected - expected.max(1, keepdims=True))
    assert np.abs(probabilities - softmax / softmax.sum(1, keepdims=True)).max() <= 1e-5
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_the_graph_names_its_weights_as_the_wire_and_carries_the_metadata():
    model = models.resolve(models.builtin("cnn-bn"), (1, 28, 28), 10)
    proto = onnx_graph.build(model, random_weights(model), {"weightrelay.round": "3"})
    assert [t.name for t in proto.graph.initializer] == list(model.manifest)
    assert {p.key: p.value for p in proto.metadata_props} == {"weightrelay.round": "3"}
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"] and proto.opset_import[0].version == onnx_graph.OPSET


def test_a_kind_without_an_onnx_function_is_refused_by_name(monkeypatch):
    monkeypatch.delitem(onnx_graph.ONNX_BUILDERS, "batchnorm")
    model = models.resolve(models.builtin("cnn-bn"), (1, 28, 28), 10)
    with pytest.raises(onnx_graph.UnsupportedKind, match=r"kind\(s\) batchnorm \(layer 1 \(batchnorm bn1\); .*layer 8 .*--format safetensors"):
        onnx_graph.build(model, random_weights(model))


@pytest.mark.parametrize("name", ["resnet20", "vit-tiny"])
def test_built_ins_of_kinds_without_an_onnx_function_are_refused_naming_them(name):
    model = models.resolve(models.builtin(name), (1, 28, 28), 10)
    missing = sorted({layer.kind for layer in model.layers} - set(onnx_graph.ONNX_BUILDERS))
    assert missing  # these built-ins use the residual and attention kinds
    with pytest.raises(onnx_graph.UnsupportedKind, match=r"kind\(s\) " + re.escape(missing[0])):
        onnx_graph.build(model, random_weights(model))


def test_the_handoff_reads_back_what_was_written_and_refuses_a_wrong_tensor(tmp_path):
    model = models.resolve(models.builtin("lenet"), (1, 28, 28), 10)
    weights = random_weights(model)
    again, read = handoff.read(handoff.write(tmp_path / "request", model, weights))
    assert again.manifest == model.manifest and all(np.array_equal(read[n], weights[n]) for n in weights)
    np.savez(tmp_path / "request" / handoff.WEIGHTS_FILE, **{**weights, "fc1.weight": weights["fc1.weight"].T})
    with pytest.raises(ValueError, match=r"tensor fc1.weight: expected float32 \[120, 400\], got float32 \[400, 120\]"):
        handoff.read(tmp_path / "request")


def kept_run(run_dir, spec_name: str = "cnn-bn", round_index: int = 4):
    """A run directory as a relay leaves it: results.json with the workers' Describe and the kept weights."""
    model = models.resolve(models.builtin(spec_name), (1, 28, 28), 10)
    weights = random_weights(model)
    run_dir.mkdir(parents=True)
    files = {name: checkpoint.save(run_dir, round_index, name, weights) for name in ("torch", "keras")}
    sums = {name: codec.weights_sha256(weights) for name in files}
    describe = {"model": message_to_dict(models.to_proto(model.spec)),
                "dataset": {"name": "mnist", "input_shape": [1, 28, 28], "class_names": [str(i) for i in range(10)]}}
    results = {"schema_version": 2, "status": "complete", "order": ["torch", "keras"], "config": {"model": spec_name},
               "workers": {name: describe for name in files}, "checkpoint": {"round": round_index, "files": files, "sha256": sums}}
    (run_dir / "results.json").write_text(json.dumps(results))
    return model, weights


def test_kept_weights_out_as_onnx_and_safetensors(tmp_path):
    model, weights = kept_run(tmp_path / "run")
    kept, path = export(tmp_path / "run", "onnx", "keras")
    assert path == tmp_path / "run" / "export" / "keras-round-004.onnx" and kept.round == 4
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    assert {p.key: p.value for p in loaded.metadata_props}["weightrelay.worker"] == "keras"
    x = digit_images(channels=1, count=8)
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))  # 28 x 28
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["logits"], {"input": x.astype(np.float32)})[0] - reference.forward(model, weights, x)).max() < 1e-4

    from safetensors.numpy import load_file
    _, path = export(tmp_path / "run", "safetensors", out=tmp_path / "w.safetensors")
    assert all(np.array_equal(load_file(path)[name], weights[name]) for name in model.manifest)


@pytest.mark.parametrize("kwargs, message", [
    ({"worker": "jax"}, "--worker jax: .* kept the weights of torch, keras; name one of them"),
    ({"round_index": 2}, "--round 2: .* keeps the weights of round 4 only .*use --round 4"),
    ({"fmt": "keras", "out": "model.h5"}, r"--out model.h5: a keras file's name ends in .weights.h5 .*--out model.weights.h5"),
])
def test_refusals_name_the_flag_and_the_fix(tmp_path, kwargs, message):
    kept_run(tmp_path / "run")
    fmt = kwargs.pop("fmt", "onnx")
    if "out" in kwargs:
        kwargs["out"] = Path(kwargs["out"])
    with pytest.raises(UsageError, match=message):
        export(tmp_path / "run", fmt, **kwargs)


def test_a_run_without_kept_weights_is_refused(tmp_path):
    (tmp_path / "twin").mkdir()
    (tmp_path / "twin" / "results.json").write_text(json.dumps({"kind": "twin", "status": "complete"}))
    with pytest.raises(UsageError, match="keeps no weights to export \\(a twin run\\)"):
        load_kept(tmp_path / "twin", None, None)
    with pytest.raises(UsageError, match="holds no results.json"):
        load_kept(tmp_path, None, None)


def test_the_default_install_imports_no_tracker_and_no_onnx():
    """A relay's whole path through the CLI (its worker unreachable) and the export of safetensors load none of them."""
    code = ("import sys, coordinator.cli as cli\n"
            "code = cli.main(['run', '--worker', 'a=127.0.0.1:9', '--connect-timeout', '0.2', '--quiet', '--out', sys.argv[1]])\n"
            "assert code == 3, code\n"
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "coordinator" in loaded and not loaded & {"mlflow", "tensorboardX", "tensorboard", "onnx", "onnxruntime", "torch", "tensorflow"}
