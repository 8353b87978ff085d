"""`python -m keras_service.export REQUEST_DIR OUT.weights.h5`: a canonical weight set as Keras weights.

The file is `model.save_weights` of `build_model(model)` with the weights in Keras' layout
(keras_service.layout), so `build_model(resolved).load_weights(OUT)` takes it into a freshly built
Keras model. See weightrelay.handoff.
"""

from __future__ import annotations

import sys
from pathlib import Path

from keras_service.adapter import build_model
from keras_service.layout import canonical_to_keras
from weightrelay.codec import WeightSet
from weightrelay.handoff import exporter_main
from weightrelay.models import ResolvedModel


def save(model: ResolvedModel, weights: WeightSet, out: Path) -> None:
    built = build_model(model)
    for name, arrays in canonical_to_keras(weights, model).items():
        built.get_layer(name).set_weights(arrays)
    built.save_weights(str(out))


if __name__ == "__main__":
    sys.exit(exporter_main(save))
