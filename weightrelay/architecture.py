"""The model every worker builds, described once so that all frameworks agree on it."""

from __future__ import annotations

from dataclasses import dataclass

from weightrelay.codec import TensorSpec

ARCHITECTURE = "mlp-784-128-64-10-relu"
INPUT_FEATURES = 784
NUM_CLASSES = 10


@dataclass(frozen=True)
class DenseLayer:
    name: str
    in_features: int
    out_features: int
    relu: bool


#: fc1 -> ReLU -> fc2 -> ReLU -> fc3 (logits)
LAYERS: tuple[DenseLayer, ...] = (
    DenseLayer("fc1", INPUT_FEATURES, 128, relu=True),
    DenseLayer("fc2", 128, 64, relu=True),
    DenseLayer("fc3", 64, NUM_CLASSES, relu=False),
)


def canonical_manifest() -> dict[str, TensorSpec]:
    """Parameter names, shapes and dtypes in the canonical layout ([out, in] weights)."""
    manifest: dict[str, TensorSpec] = {}
    for layer in LAYERS:
        manifest[f"{layer.name}.weight"] = TensorSpec(f"{layer.name}.weight", "float32", (layer.out_features, layer.in_features))
        manifest[f"{layer.name}.bias"] = TensorSpec(f"{layer.name}.bias", "float32", (layer.out_features,))
    return manifest
