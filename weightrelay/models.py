"""Model specs: one description of a network that every framework's worker builds alike.

A `ModelSpec` is a list of layers, each an instance of a layer kind (`weightrelay.layers`: dense,
conv2d, maxpool2d, flatten, batchnorm, dropout). `resolve` walks it over a data set's input shape
(C, H, W) and class count and yields each layer's shapes and parameters in the canonical layout, so
the manifest, the numpy reference forward pass (`weightrelay.reference`) and every adapter's
builder read the same numbers. Everything a kind decides is its class's; the functions here loop
over the layers and ask them.

Specs come from a built-in name (`mlp`, `mlp:W1,W2,...`, `lenet`, `cnn-bn`), a TOML file, or
an InitializeRequest (`to_proto` / `from_proto`).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from weightrelay.codec import TensorSpec
from weightrelay.layers import (  # noqa: F401  (the kinds and their vocabulary are used as models.X)
    ACTIVATIONS, CLASSES, KINDS, PADDINGS, BatchNorm, Conv2D, Dense, Dropout, Flatten, Flow, Layer, LayerError, MaxPool2D,
    ResolvedLayer, SpecError, at, kind_class, label, same_padding,
)
from weightrelay.v1 import worker_pb2 as pb

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Largest weight set a spec may describe (elements): 2**31 floats is 8 GiB.
MAX_PARAMETERS = 2**31


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: tuple[Layer, ...]

    def named(self) -> "ModelSpec":
        """The same spec with every layer named: given names kept, others `fc1`, `conv1`, `bn1`, ... by kind."""
        counts: dict[str, int] = {}
        layers = []
        for layer in self.layers:
            counts[layer.kind] = counts.get(layer.kind, 0) + 1
            layers.append(layer if layer.name else replace(layer, name=f"{layer.prefix}{counts[layer.kind]}"))
        return ModelSpec(self.name, tuple(layers))


# -- built-ins -----------------------------------------------------------------------------
def mlp(widths: tuple[int, ...] = (128, 64), name: str = "mlp") -> ModelSpec:
    """flatten -> dense(w, relu) for each width -> dense(classes)."""
    return ModelSpec(name, (Flatten(), *(Dense(w, "relu") for w in widths), Dense(CLASSES)))


def lenet() -> ModelSpec:
    """LeNet-5: conv 6@5x5 same -> pool -> conv 16@5x5 -> pool -> dense 120 -> dense 84 -> dense classes."""
    return ModelSpec("lenet", (
        Conv2D(6, 5, padding="same", activation="relu"), MaxPool2D(2),
        Conv2D(16, 5, activation="relu"), MaxPool2D(2),
        Flatten(), Dense(120, "relu"), Dense(84, "relu"), Dense(CLASSES),
    ))


def cnn_bn() -> ModelSpec:
    """Two conv -> batchnorm -> relu -> pool blocks, a dense layer with batchnorm, dropout, and the output."""
    return ModelSpec("cnn-bn", (
        Conv2D(16, 3, padding="same"), BatchNorm(activation="relu"), MaxPool2D(2),
        Conv2D(32, 3, padding="same"), BatchNorm(activation="relu"), MaxPool2D(2),
        Flatten(), Dense(64), BatchNorm(activation="relu"), Dropout(0.25), Dense(CLASSES),
    ))


BUILTINS = {"mlp": mlp, "lenet": lenet, "cnn-bn": cnn_bn}
BUILTIN_HELP = "mlp (the default: 784-128-64-10), mlp:W1,W2,... (hidden widths), lenet, cnn-bn, or a FILE.toml"
DEFAULT_MODEL = "mlp"


def builtin(name: str) -> ModelSpec:
    """A built-in spec by name: `mlp`, `mlp:W1,W2,...`, `lenet`, `cnn-bn`."""
    text = name.strip().lower()
    if text in BUILTINS:
        return BUILTINS[text]()
    kind, sep, args = text.partition(":")
    if kind == "mlp" and sep:
        try:
            widths = tuple(int(part) for part in args.split(","))
        except ValueError:
            raise SpecError(f"model {name!r}: hidden widths must be whole numbers, e.g. mlp:512,256") from None
        if not widths or any(w < 1 for w in widths):
            raise SpecError(f"model {name!r}: give one or more hidden widths of at least 1, e.g. mlp:512,256")
        return mlp(widths, name=f"mlp:{','.join(map(str, widths))}")
    raise SpecError(f"unknown model {name!r}; use {BUILTIN_HELP}")


def load_model(name_or_path: str) -> ModelSpec:
    """A built-in name, or the path of a TOML model file (see `spec_from_dict`)."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".toml") or path.is_file():
        try:
            document = tomllib.loads(path.read_text())
        except OSError as exc:
            raise SpecError(f"cannot read model file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"model file {path} is not valid TOML: {exc}") from None
        return spec_from_dict(document, default_name=path.stem, source=str(path))
    return builtin(name_or_path)


def spec_from_dict(document: dict[str, Any], default_name: str = "custom", source: str = "model") -> ModelSpec:
    """A spec from `{name = "...", layers = [{kind = "conv2d", filters = 6, ...}, ...]}` (TOML's [[layers]])."""
    layers_in = document.get("layers")
    unknown = set(document) - {"name", "layers"}
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; a model has `name` and [[layers]]")
    if not isinstance(layers_in, list) or not layers_in:
        raise SpecError(f"{source}: no layers; add [[layers]] tables, each with a `kind` ({', '.join(KINDS)})")
    layers = []
    for index, entry in enumerate(layers_in):
        where = f"{source}: layer {index}"
        if not isinstance(entry, dict) or "kind" not in entry:
            raise SpecError(f"{where}: needs a `kind` ({', '.join(KINDS)})")
        with at(where):
            cls = kind_class(entry["kind"])
        with at(f"{where} ({cls.kind})"):
            layers.append(cls.from_dict({key: value for key, value in entry.items() if key != "kind"}))
    spec = ModelSpec(str(document.get("name") or default_name), tuple(layers))
    validate(spec)
    return spec


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The TOML/JSON form of a spec (every field written out)."""
    return {"name": spec.name, "layers": [layer.to_dict() for layer in spec.layers]}


def validate(spec: ModelSpec) -> None:
    """Check each layer's own values (shapes are checked by `resolve`)."""
    names = set()
    for index, layer in enumerate(spec.layers):
        if not isinstance(layer, Layer) or KINDS.get(getattr(layer, "kind", None)) is not type(layer):
            raise SpecError(f"layer {index}: {type(layer).__name__} is not a layer kind")
        where = label(index, layer.kind, layer.name)
        if layer.name:
            if not _NAME.match(layer.name):
                raise SpecError(f"{where}: name {layer.name!r} must be letters, digits and _ (not starting with a digit), at most 64")
            if layer.name in names:
                raise SpecError(f"{where}: the name {layer.name!r} is used twice")
            names.add(layer.name)
        with at(where):
            layer.check()
    if not spec.layers:
        raise SpecError("a model needs at least one layer")


# -- resolution over a data set ------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    input_shape: tuple[int, int, int]
    num_classes: int
    layers: tuple[ResolvedLayer, ...] = field(default=())

    @property
    def manifest(self) -> dict[str, TensorSpec]:
        return {p.name: p for layer in self.layers for p in layer.params}

    @property
    def parameter_count(self) -> int:
        return sum(int(math.prod(p.shape)) for p in self.manifest.values())

    def describe(self) -> str:
        """One line, e.g. "lenet: 1x28x28 -> conv1 conv2d 6@5x5 same relu [6x28x28] -> ... -> fc3 dense 10"."""
        parts = ["x".join(map(str, self.input_shape)), *(r.describe() for r in self.layers)]
        return f"{self.spec.name}: " + " -> ".join(parts)


def resolve(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> ResolvedModel:
    """Walk the spec over one sample's shape (C, H, W); raise SpecError naming the layer that does not fit."""
    validate(spec)
    spec = spec.named()
    validate(spec)  # default names may clash with given ones
    flow = Flow(tuple(int(d) for d in input_shape))
    resolved: list[ResolvedLayer] = []
    for index, layer in enumerate(spec.layers):
        with at(label(index, layer.kind, layer.name)):
            resolved.append(layer.resolve((flow,), num_classes))  # each layer takes the output of the one before
        flow = resolved[-1].output
    if flow.shape != (num_classes,):
        raise SpecError(
            f"model {spec.name!r} ends in shape {list(flow.shape)}, but the data set has {num_classes} classes; "
            "end with a dense layer of units = 0 (one per class)"
        )
    model = ResolvedModel(spec, tuple(int(d) for d in input_shape), num_classes, tuple(resolved))
    if model.parameter_count > MAX_PARAMETERS:
        raise SpecError(f"model {spec.name!r} has {model.parameter_count} parameters, more than the {MAX_PARAMETERS} allowed")
    return model


# -- proto <-> spec ------------------------------------------------------------------------
def to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(name=spec.name, layers=[layer.to_proto() for layer in spec.layers])


def from_proto(message: pb.ModelSpec) -> ModelSpec:
    """A spec from a message; a message with a name and no layers names a built-in."""
    if not message.layers:
        return builtin(message.name or DEFAULT_MODEL)
    layers = []
    for index, entry in enumerate(message.layers):
        kind = entry.WhichOneof("kind")
        if kind is None:
            raise SpecError(f"layer {index}: no kind set; set one of {', '.join(KINDS)}")
        with at(label(index, kind)):
            layers.append(kind_class(kind).from_proto(entry))
    spec = ModelSpec(message.name or "custom", tuple(layers))
    validate(spec)
    return spec
