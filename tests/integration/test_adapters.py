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
