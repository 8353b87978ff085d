"""The PyTorch adapter holds a large dense weight in [in, out] memory (TorchAdapter.held), as Keras and JAX hold
their kernels. Run in a subprocess: one framework per process (the unit tests' own process loads none)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO

CHECKS = r'''
import numpy as np, torch
from torch_service.adapter import SpecModel, TorchAdapter
from weightrelay.adapter import ProgressTracker, TrainConfig
from weightrelay.models import load_model, resolve

model = resolve(load_model("mlp:1024,512"), (1, 28, 28), 10)
adapter = TorchAdapter("cpu")
adapter.build(model, seed=3)
assert adapter.held == {"fc1.weight", "fc2.weight"}, adapter.held  # fc3 [10, 512]: under 1 MiB, kept [out, in]

torch.manual_seed(3)
plain = SpecModel(model)  # nn.Linear's own [out, in] memory, seeded alike: the same first values
first = adapter.get_weights()
assert all(np.array_equal(first[name], plain.state_dict()[name].numpy()) for name in first)

def memory(name):
    return adapter.model.get_parameter(name)

views = adapter.weight_views()
for name in adapter.names:  # views share the parameters' memory, held ones as [in, out] seen as [out, in]
    assert views[name].ctypes.data == memory(name).data_ptr() and np.array_equal(views[name], first[name]), name
    assert views[name].flags.c_contiguous == (name not in adapter.held) and (name not in adapter.held or views[name].T.flags.c_contiguous), name

rng = np.random.default_rng(0)
incoming = {name: rng.standard_normal(a.shape).astype(np.float32) for name, a in first.items()}
as_received = {name: np.ascontiguousarray(a.T).T if name in adapter.held else a.copy() for name, a in incoming.items()}
assert adapter.conversion(dict.fromkeys(adapter.names)).targets == adapter.held
assert adapter.adopt_weights(as_received)  # the receive's [in, out] memory becomes the parameter's
for name in adapter.names:
    assert memory(name).data_ptr() == as_received[name].ctypes.data and np.array_equal(adapter.get_weights()[name], incoming[name]), name
assert memory("fc1.weight").stride() == (1, 1024)

canonical = {name: a * 2 for name, a in incoming.items()}  # C-contiguous [out, in]: copied, the layout kept
assert not adapter.adopt_weights(canonical) and memory("fc1.weight").data_ptr() == as_received["fc1.weight"].ctypes.data
adapter.set_weights(canonical)
assert memory("fc1.weight").stride() == (1, 1024) and memory("fc2.weight").stride() == (1, 512)
assert all(np.array_equal(adapter.get_weights()[name], canonical[name]) for name in canonical)
read = {name: np.empty_like(a) for name, a in canonical.items()}  # C-contiguous, as the worker's snapshot arena
adapter.read_weights(read)
assert all(np.array_equal(read[name], canonical[name]) for name in canonical)
big = TorchAdapter("cpu")  # over NUMPY_COPY_BYTES: the copies torch would make, here by tiles
big.build(resolve(load_model("mlp:4096,2048"), (1, 28, 28), 10), seed=5)
assert big.held == {"fc1.weight", "fc2.weight"} and big.get_weights()["fc2.weight"].nbytes > 16 * 1024 * 1024
values = {name: rng.standard_normal(a.shape).astype(np.float32) for name, a in big.get_weights().items()}
big.set_weights(values)
assert big.model.fc2.weight.stride() == (1, 2048) and all(np.array_equal(a, values[name]) for name, a in big.get_weights().items())
read = {name: np.empty_like(a) for name, a in values.items()}
big.read_weights(read)
assert all(np.array_equal(read[name], values[name]) for name in values)

x = rng.random((64, 1, 28, 28), dtype=np.float32)
plain.load_state_dict({name: torch.from_numpy(a) for name, a in canonical.items()})
plain.eval()
with torch.inference_mode():
    expected = plain(torch.from_numpy(x)).numpy()
np.testing.assert_allclose(adapter.predict_logits(x, 32), expected, rtol=1e-5, atol=1e-5)

config = TrainConfig(batch_size=16, learning_rate=0.01, momentum=0.9, max_steps=3)
y = rng.integers(0, 10, 64)
adapter.train(x, y, config, ProgressTracker(config, len(x), lambda progress: None))
trained = adapter.get_weights()
assert memory("fc1.weight").stride() == (1, 1024) and memory("fc2.weight").stride() == (1, 512)  # SGD keeps the layout
assert not np.array_equal(trained["fc1.weight"], canonical["fc1.weight"]) and all(np.isfinite(a).all() for a in trained.values())
print("ok")
'''


def test_torch_holds_large_dense_weights_in_their_transpose_and_keeps_them_so():
    """Built, its first values are nn.Linear's own; its views and adopted sets share the parameters' [in, out]
    memory; a canonical set is copied in with the layout kept; predictions match a plain [out, in] model on
    the same weights; training keeps the layout."""
    done = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:] + done.stdout
