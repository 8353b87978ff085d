"""`python -m tests.framework_predict torch|keras FILE RUN_DIR WORKER DATA_DIR OUT.npy`: load a file that
`coordinator export --format torch|keras` wrote into a freshly built model of that framework (built from
the run's spec, as a user would) and save its probabilities on the test set. One framework per process."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from coordinator.export import load_kept
from weightrelay.data import load_mnist
from weightrelay.metrics import log_softmax


def torch_logits(model, path: Path, x: np.ndarray) -> np.ndarray:
    import torch

    from torch_service.adapter import SpecModel

    built = SpecModel(model)
    built.load_state_dict(torch.load(path, weights_only=True))  # strict: every name and shape must match
    built.eval()
    with torch.inference_mode():
        return built(torch.from_numpy(x)).numpy()


def keras_logits(model, path: Path, x: np.ndarray) -> np.ndarray:
    from keras_service.adapter import build_model
    from weightrelay.layouts import to_nhwc

    built = build_model(model)
    built.load_weights(str(path))
    return np.concatenate([np.asarray(built(to_nhwc(x[i : i + 1000]), training=False)) for i in range(0, len(x), 1000)])


def main(framework: str, path: str, run_dir: str, worker: str, data_dir: str, out: str) -> int:
    model = load_kept(Path(run_dir), worker, None).model
    x = load_mnist(data_dir, download=False).test.x
    logits = {"torch": torch_logits, "keras": keras_logits}[framework](model, Path(path), x)
    np.save(out, np.exp(log_softmax(logits)).astype(np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
