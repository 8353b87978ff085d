"""An adapter's own guarantees, checked in a process of its own (one framework per process, as the workers run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.integration

KERAS_REFUSES_A_WRONG_SET = """
import numpy as np
from keras_service.adapter import KerasAdapter
from weightrelay import models

adapter = KerasAdapter("cpu")
adapter.build(models.resolve(models.builtin("mlp"), (1, 28, 28), 10), seed=1)
before = adapter.get_weights()
changed = {name: array + 1 for name, array in before.items()}
adapter.set_weights(changed)
assert all(np.array_equal(adapter.get_weights()[name], changed[name]) for name in before), "set_weights did not apply"
for name, bad in [("fc3.weight", changed["fc3.weight"].T.copy()), ("fc3.bias", changed["fc3.bias"].astype(np.float64))]:
    wrong = {**before, name: bad}  # checked before anything is assigned: fc1 and fc2 must keep their values too
    try:
        adapter.set_weights(wrong)
    except ValueError as exc:
        print("refused:", exc)
    else:
        raise AssertionError(f"a {bad.dtype} {list(bad.shape)} {name} was taken")
    assert all(np.array_equal(adapter.get_weights()[n], changed[n]) for n in before), f"a refused set changed the model ({name})"
print("ok")
"""


def test_keras_set_weights_refuses_a_wrong_shape_or_dtype_before_assigning_anything():
    done = subprocess.run([sys.executable, "-c", KERAS_REFUSES_A_WRONG_SET], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
    refusals = [line for line in done.stdout.splitlines() if line.startswith("refused: variable")]
    assert len(refusals) == 2 and "[64, 10], got float32 [10, 64]" in refusals[0] and "got float64" in refusals[1], done.stdout


KERAS_TRAINS_AS_FIT_DOES = """
import numpy as np, keras
from keras_service.adapter import KerasAdapter, compiles_well
from weightrelay import models
from weightrelay.adapter import ProgressTracker, TrainConfig, schedule
from weightrelay.layouts import to_nhwc

rng = np.random.default_rng(0)
x = rng.random((650, 1, 28, 28), dtype=np.float32)  # 10 batches of 64 and one of 10
y = rng.integers(0, 10, 650).astype(np.int64)
config = TrainConfig(batch_size=64, learning_rate=0.05, momentum=0.9, seed=3, progress_every_batches=4)
order = np.concatenate([step.indices for step in schedule(config, len(x))[0]])
for name in ("mlp", "lenet"):  # through XLA, and not
    spec = models.resolve(models.builtin(name), (1, 28, 28), 10)
    adapter = KerasAdapter("cpu")
    adapter.build(spec, seed=1)
    start = adapter.get_weights()
    reports = []
    adapter.train(x, y, config, ProgressTracker(config, len(x), reports.append))
    reference = keras.models.clone_model(adapter.model)
    adapter.set_weights(start)
    reference.set_weights([v.numpy() for v in adapter.model.weights])
    reference.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = reference.fit(to_nhwc(x)[order], y[order], batch_size=64, epochs=1, shuffle=False, verbose=0).history
    adapter.train(x, y, config, ProgressTracker(config, len(x), lambda progress: None))
    ours = [v.numpy() for v in adapter.model.weights]
    for mine, theirs, variable in zip(ours, reference.get_weights(), adapter.model.weights):
        assert np.allclose(mine, theirs, rtol=1e-4, atol=1e-5), f"{name} {variable.path}: max difference {np.abs(mine - theirs).max()}"
    assert [r.batch for r in reports] == [4, 8, 11], [r.batch for r in reports]
    assert abs(reports[-1].loss - history["loss"][0]) < 1e-4 and abs(reports[-1].accuracy - history["accuracy"][0]) < 1e-6, (reports[-1], history)
    print(name, "xla" if compiles_well(spec) else "no xla", "ok")
print("ok")
"""


def test_keras_compiled_steps_make_the_updates_fit_makes():
    """The Keras adapter trains with its own compiled steps (XLA for dense-only models): from the same weights, over the
    same batches, it must end where `model.fit` ends and report fit's epoch loss and accuracy, at the batches asked for."""
    done = subprocess.run([sys.executable, "-c", KERAS_TRAINS_AS_FIT_DOES], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == ["mlp xla ok", "lenet no xla ok", "ok"], done.stdout


KERAS_FREED_TENSOR_MEMORY = r"""
import json, os, sys
import keras_service.adapter  # sets the worker's TensorFlow environment before TensorFlow starts
import tensorflow as tf
from weightrelay.buffers import release_freed_memory, rss_bytes

before = rss_bytes()
large = tf.random.uniform((64 * 1024 * 1024,), dtype=tf.float32)  # 256 MiB, as Keras' initializers make
total = float(tf.reduce_sum(large))
del large
release_freed_memory()
print(json.dumps({"allocator": os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"], "kept": rss_bytes() - before, "total": total}))
"""


@pytest.mark.parametrize("setting", [None, "0"])
def test_a_keras_worker_hands_freed_tensor_memory_back_unless_told_to_keep_a_pool(setting):
    """A Keras worker takes large tensors from the C library, so what Keras' initializers once used is not held
    for good (oneDNN's pool keeps its peak: with TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0, which a user may set)."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"}
    if setting is not None:
        env["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = setting
    done = subprocess.run([sys.executable, "-c", KERAS_FREED_TENSOR_MEMORY], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["total"] > 0
    if setting is None:
        assert result["allocator"] == "1"
        assert result["kept"] < 64 * 1024 * 1024, result
    else:
        assert result["allocator"] == "0"
        assert result["kept"] > 200 * 1024 * 1024, result
