"""`python -m torch_service.export REQUEST_DIR OUT`: a canonical weight set as a PyTorch state_dict file.

The file is `torch.save` of `SpecModel(model).state_dict()`: the parameter and buffer names are the
canonical ones, so `SpecModel(resolved).load_state_dict(torch.load(OUT, weights_only=True))` takes it
into a freshly built model (weights_only: loading it runs no pickled code). See weightrelay.handoff.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from torch_service.adapter import SpecModel
from weightrelay.codec import WeightSet
from weightrelay.handoff import exporter_main
from weightrelay.models import ResolvedModel


def save(model: ResolvedModel, weights: WeightSet, out: Path) -> None:
    built = SpecModel(model)
    state = built.state_dict()
    with torch.no_grad():
        for name in model.manifest:
            state[name].copy_(torch.from_numpy(weights[name]))
    torch.save(built.state_dict(), out)


if __name__ == "__main__":
    sys.exit(exporter_main(save))
