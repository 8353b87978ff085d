"""A model and its canonical weights handed to one framework's own exporter, a process of its own.

The coordinator imports no deep-learning framework, so a PyTorch state_dict or a Keras weights
file is written by the worker's package in a subprocess (`python -m torch_service.export` /
`python -m keras_service.export REQUEST_DIR OUT`). The request is a directory with the resolved
spec as JSON and the weights as an .npz read without pickle; what is read is checked against the
spec's manifest, name by name, before any framework sees it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from weightrelay import models
from weightrelay.codec import WeightSet

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"


def write(directory: Path, model: models.ResolvedModel, weights: Mapping[str, np.ndarray]) -> Path:
    """Write the request for `model` with `weights` (canonical) into `directory`; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"model": models.spec_to_dict(model.spec), "input_shape": list(model.input_shape), "classes": model.num_classes}
    (directory / SPEC_FILE).write_text(json.dumps(spec))
    np.savez(directory / WEIGHTS_FILE, **{name: np.ascontiguousarray(weights[name]) for name in model.manifest})
    return directory


def read(directory: Path) -> tuple[models.ResolvedModel, WeightSet]:
    """The resolved model and its weights, checked against its manifest (ValueError naming the tensor)."""
    spec = json.loads((directory / SPEC_FILE).read_text())
    model = models.resolve(models.spec_from_dict(spec["model"]), tuple(spec["input_shape"]), int(spec["classes"]))
    with np.load(directory / WEIGHTS_FILE, allow_pickle=False) as stored:
        weights = {name: stored[name] for name in stored.files}
    for name, expected in model.manifest.items():
        if name not in weights:
            raise ValueError(f"tensor {name}: missing from {directory / WEIGHTS_FILE}")
        if tuple(weights[name].shape) != expected.shape or weights[name].dtype != np.dtype(expected.dtype):
            raise ValueError(f"tensor {name}: expected {expected.dtype} {list(expected.shape)}, "
                             f"got {weights[name].dtype} {list(weights[name].shape)}")
    return model, {name: weights[name] for name in model.manifest}


def exporter_main(save: Callable[[models.ResolvedModel, WeightSet, Path], None], argv: Sequence[str] | None = None) -> int:
    """The command line of a framework's exporter: REQUEST_DIR OUT; exit 2 with the reason on bad input."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m <framework>_service.export REQUEST_DIR OUT", file=sys.stderr)
        return 2
    try:
        model, weights = read(Path(args[0]))
    except (OSError, ValueError, KeyError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    save(model, weights, Path(args[1]))
    return 0
