"""Model specs: one description of a network that every framework's worker builds alike.

A `ModelSpec` is a list of layers (dense, conv2d, maxpool2d, flatten, batchnorm, dropout).
`resolve` walks it over a data set's input shape (C, H, W) and class count and yields each
layer's shapes and parameters in the canonical layout, so the manifest, the numpy reference
forward pass (`weightrelay.reference`) and every adapter's builder read the same numbers.

Canonical layout (see worker.proto): dense `<name>.weight` [out, in]; conv2d `<name>.weight`
[out, in, kh, kw]; `<name>.bias` [out]; batchnorm `.weight`, `.bias`, `.running_mean`,
`.running_var` [channels] (the last two are buffers); activations flow as N, C, H, W, and a
flatten orders features C, H, W.

Specs come from a built-in name (`mlp`, `mlp:W1,W2,...`, `lenet`, `cnn-bn`), a TOML file, or
an InitializeRequest (`to_proto` / `from_proto`).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

from weightrelay.codec import TensorSpec
from weightrelay.v1 import worker_pb2 as pb

ACTIVATIONS = ("none", "relu", "tanh", "sigmoid")
PADDINGS = ("valid", "same")
#: `units = 0` in a dense layer: one unit per class of the data set (the output layer).
CLASSES = 0
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Largest weight set a spec may describe (elements): 2**31 floats is 8 GiB.
MAX_PARAMETERS = 2**31


class SpecError(ValueError):
    """A model spec is malformed or does not fit the data set; the message names the layer and the fix."""


@dataclass(frozen=True)
class Dense:
    units: int = CLASSES
    activation: str = "none"
    name: str = ""


@dataclass(frozen=True)
class Conv2D:
    filters: int = 1
    kernel: int = 3
    stride: int = 1
    padding: str = "valid"
    activation: str = "none"
    name: str = ""


@dataclass(frozen=True)
class MaxPool2D:
    size: int = 2
    stride: int = 0  # 0: the pool size
    name: str = ""


@dataclass(frozen=True)
class Flatten:
    name: str = ""


@dataclass(frozen=True)
class BatchNorm:
    """Normalises over the channel axis. `momentum` is PyTorch's: the weight of the new batch
    statistic in the running average (Keras' momentum is 1 - this); `eps` is added to the variance."""

    eps: float = 1e-5
    momentum: float = 0.1
    activation: str = "none"
    name: str = ""


@dataclass(frozen=True)
class Dropout:
    rate: float = 0.5
    name: str = ""


Layer = Union[Dense, Conv2D, MaxPool2D, Flatten, BatchNorm, Dropout]
#: kind name (TOML `kind`, proto oneof field) -> layer class, and the prefix of default names
KINDS: dict[str, type] = {"dense": Dense, "conv2d": Conv2D, "maxpool2d": MaxPool2D, "flatten": Flatten, "batchnorm": BatchNorm, "dropout": Dropout}
KIND_OF: dict[type, str] = {cls: kind for kind, cls in KINDS.items()}
_NAME_PREFIX = {"dense": "fc", "conv2d": "conv", "maxpool2d": "pool", "flatten": "flatten", "batchnorm": "bn", "dropout": "dropout"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: tuple[Layer, ...]

    def named(self) -> "ModelSpec":
        """The same spec with every layer named: given names kept, others `fc1`, `conv1`, `bn1`, ... by kind."""
        counts: dict[str, int] = {}
        layers = []
        for layer in self.layers:
            kind = KIND_OF[type(layer)]
            counts[kind] = counts.get(kind, 0) + 1
            layers.append(layer if layer.name else replace(layer, name=f"{_NAME_PREFIX[kind]}{counts[kind]}"))
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
        kind = str(entry["kind"]).lower()
        cls = KINDS.get(kind)
        if cls is None:
            raise SpecError(f"{where}: unknown kind {entry['kind']!r}; use one of {', '.join(KINDS)}")
        allowed = {f.name for f in fields(cls)}
        values = {k: v for k, v in entry.items() if k != "kind"}
        extra = set(values) - allowed
        if extra:
            raise SpecError(f"{where} ({kind}): unknown key(s) {', '.join(sorted(extra))}; {kind} takes {', '.join(sorted(allowed))}")
        if kind == "dense" and values.get("units") == "classes":
            values["units"] = CLASSES
        layers.append(cls(**values))
    spec = ModelSpec(str(document.get("name") or default_name), tuple(layers))
    validate(spec)
    return spec


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The TOML/JSON form of a spec (every field written out)."""
    return {"name": spec.name, "layers": [{"kind": KIND_OF[type(layer)], **{f.name: getattr(layer, f.name) for f in fields(layer)}} for layer in spec.layers]}


def validate(spec: ModelSpec) -> None:
    """Check each layer's own values (shapes are checked by `resolve`)."""
    names = set()
    for index, layer in enumerate(spec.layers):
        kind = KIND_OF.get(type(layer))
        where = f"layer {index} ({kind}{' ' + layer.name if getattr(layer, 'name', '') else ''})"
        if kind is None:
            raise SpecError(f"layer {index}: {type(layer).__name__} is not a layer kind")
        if layer.name:
            if not _NAME.match(layer.name):
                raise SpecError(f"{where}: name {layer.name!r} must be letters, digits and _ (not starting with a digit), at most 64")
            if layer.name in names:
                raise SpecError(f"{where}: the name {layer.name!r} is used twice")
            names.add(layer.name)

        def whole(field_name: str, minimum: int) -> None:
            value = getattr(layer, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise SpecError(f"{where}: {field_name} must be a whole number of at least {minimum}, got {value!r}")

        def fraction(field_name: str, low_open: bool) -> None:
            value = getattr(layer, field_name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not ((0 < value if low_open else 0 <= value) and value < 1):
                raise SpecError(f"{where}: {field_name} must be a number in {'(0' if low_open else '[0'}, 1), got {value!r}")

        if hasattr(layer, "activation") and layer.activation not in ACTIVATIONS:
            raise SpecError(f"{where}: activation {layer.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if isinstance(layer, Dense):
            whole("units", 0)
        elif isinstance(layer, Conv2D):
            whole("filters", 1), whole("kernel", 1), whole("stride", 1)
            if layer.padding not in PADDINGS:
                raise SpecError(f"{where}: padding {layer.padding!r} is not one of {', '.join(PADDINGS)}")
        elif isinstance(layer, MaxPool2D):
            whole("size", 1), whole("stride", 0)
        elif isinstance(layer, BatchNorm):
            fraction("eps", low_open=True)
            fraction("momentum", low_open=True)
        elif isinstance(layer, Dropout):
            fraction("rate", low_open=False)
    if not spec.layers:
        raise SpecError("a model needs at least one layer")


# -- resolution over a data set ------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedLayer:
    layer: Layer
    input_shape: tuple[int, ...]   # per sample: (C, H, W) or (features,)
    output_shape: tuple[int, ...]
    params: tuple[TensorSpec, ...] = ()
    #: conv2d: zero padding (top, bottom, left, right), TensorFlow's SAME rule for "same"
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    #: dense right after a flatten of (C, H, W): that shape; frameworks that flatten H, W, C permute here
    flattened_from: tuple[int, int, int] | None = None

    @property
    def kind(self) -> str:
        return KIND_OF[type(self.layer)]

    @property
    def name(self) -> str:
        return self.layer.name


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
        parts = ["x".join(map(str, self.input_shape))]
        for r in self.layers:
            layer = r.layer
            if isinstance(layer, Conv2D):
                what = f"conv2d {layer.filters}@{layer.kernel}x{layer.kernel}/{layer.stride} {layer.padding}"
            elif isinstance(layer, Dense):
                what = f"dense {r.output_shape[0]}"
            elif isinstance(layer, MaxPool2D):
                what = f"maxpool2d {layer.size}/{layer.stride or layer.size}"
            elif isinstance(layer, BatchNorm):
                what = f"batchnorm eps={layer.eps:g} momentum={layer.momentum:g}"
            elif isinstance(layer, Dropout):
                what = f"dropout {layer.rate:g}"
            else:
                what = "flatten"
            act = getattr(layer, "activation", "none")
            parts.append(f"{r.name} {what}{' ' + act if act != 'none' else ''} [{'x'.join(map(str, r.output_shape))}]")
        return f"{self.spec.name}: " + " -> ".join(parts)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: output ceil(size / stride), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> ResolvedModel:
    """Walk the spec over one sample's shape (C, H, W); raise SpecError naming the layer that does not fit."""
    validate(spec)
    spec = spec.named()
    validate(spec)  # default names may clash with given ones
    shape = tuple(int(d) for d in input_shape)
    resolved: list[ResolvedLayer] = []
    previous_flatten: tuple[int, int, int] | None = None
    for index, layer in enumerate(spec.layers):
        where = f"layer {index} ({KIND_OF[type(layer)]} {layer.name})"
        spatial = len(shape) == 3
        f32 = lambda suffix, dims: TensorSpec(f"{layer.name}.{suffix}", "float32", tuple(dims))  # noqa: E731
        flattened_from = None
        padding = (0, 0, 0, 0)
        if isinstance(layer, Dense):
            if spatial:
                raise SpecError(f"{where}: a dense layer needs flat input, got {list(shape)}; put a flatten before it")
            units = layer.units or num_classes
            out = (units,)
            params = (f32("weight", (units, shape[0])), f32("bias", (units,)))
            flattened_from = previous_flatten
        elif isinstance(layer, Conv2D):
            if not spatial:
                raise SpecError(f"{where}: conv2d needs (C, H, W) input, got {list(shape)}")
            c, h, w = shape
            if layer.padding == "same":
                top, bottom = same_padding(h, layer.kernel, layer.stride)
                left, right = same_padding(w, layer.kernel, layer.stride)
                padding = (top, bottom, left, right)
            oh = (h + padding[0] + padding[1] - layer.kernel) // layer.stride + 1
            ow = (w + padding[2] + padding[3] - layer.kernel) // layer.stride + 1
            if oh < 1 or ow < 1:
                raise SpecError(f"{where}: a {layer.kernel}x{layer.kernel} kernel does not fit input {list(shape)}; use padding \"same\" or a smaller kernel")
            out = (layer.filters, oh, ow)
            params = (f32("weight", (layer.filters, c, layer.kernel, layer.kernel)), f32("bias", (layer.filters,)))
        elif isinstance(layer, MaxPool2D):
            if not spatial:
                raise SpecError(f"{where}: maxpool2d needs (C, H, W) input, got {list(shape)}")
            c, h, w = shape
            stride = layer.stride or layer.size
            if layer.size > h or layer.size > w:
                raise SpecError(f"{where}: pool size {layer.size} is larger than the input {list(shape)}")
            out = (c, (h - layer.size) // stride + 1, (w - layer.size) // stride + 1)
            params = ()
        elif isinstance(layer, Flatten):
            out = (int(math.prod(shape)),)
            params = ()
        elif isinstance(layer, BatchNorm):
            if previous_flatten is not None and previous_flatten[0] > 1 and previous_flatten[1] * previous_flatten[2] > 1:
                raise SpecError(f"{where}: a batchnorm right after flattening {list(previous_flatten)} would normalise "
                                "features whose order differs between frameworks; put it before the flatten or after a dense layer")
            channels = shape[0]
            params = (f32("weight", (channels,)), f32("bias", (channels,)),
                      replace(f32("running_mean", (channels,)), buffer=True), replace(f32("running_var", (channels,)), buffer=True))
            out = shape
        else:  # Dropout
            out = shape
            params = ()
        previous_flatten = shape if isinstance(layer, Flatten) and spatial else (previous_flatten if isinstance(layer, Dropout) else None)
        resolved.append(ResolvedLayer(layer, shape, out, params, padding, flattened_from))
        shape = out
    if shape != (num_classes,):
        raise SpecError(
            f"model {spec.name!r} ends in shape {list(shape)}, but the data set has {num_classes} classes; "
            "end with a dense layer of units = 0 (one per class)"
        )
    model = ResolvedModel(spec, tuple(int(d) for d in input_shape), num_classes, tuple(resolved))
    if model.parameter_count > MAX_PARAMETERS:
        raise SpecError(f"model {spec.name!r} has {model.parameter_count} parameters, more than the {MAX_PARAMETERS} allowed")
    return model


# -- proto <-> spec ------------------------------------------------------------------------
_ACT_TO_PROTO = {a: pb.Activation.Value(f"ACTIVATION_{a.upper()}") for a in ACTIVATIONS}
_ACT_FROM_PROTO = {v: k for k, v in _ACT_TO_PROTO.items()}
_PAD_TO_PROTO = {p: pb.Padding.Value(f"PADDING_{p.upper()}") for p in PADDINGS}
_PAD_FROM_PROTO = {v: k for k, v in _PAD_TO_PROTO.items()}


def to_proto(spec: ModelSpec) -> pb.ModelSpec:
    message = pb.ModelSpec(name=spec.name)
    for layer in spec.layers:
        kind = KIND_OF[type(layer)]
        values = {f.name: getattr(layer, f.name) for f in fields(layer) if f.name != "name"}
        if "activation" in values:
            values["activation"] = _ACT_TO_PROTO[values["activation"]]
        if "padding" in values:
            values["padding"] = _PAD_TO_PROTO[values["padding"]]
        entry = message.layers.add(name=layer.name)
        getattr(entry, kind).CopyFrom(getattr(pb, f"{type(layer).__name__}Layer")(**values))
    return message


def from_proto(message: pb.ModelSpec) -> ModelSpec:
    """A spec from a message; a message with a name and no layers names a built-in."""
    if not message.layers:
        return builtin(message.name or DEFAULT_MODEL)
    layers = []
    for index, entry in enumerate(message.layers):
        kind = entry.WhichOneof("kind")
        if kind is None:
            raise SpecError(f"layer {index}: no kind set; set one of {', '.join(KINDS)}")
        part = getattr(entry, kind)
        values: dict[str, Any] = {f.name: getattr(part, f.name) for f in fields(KINDS[kind]) if f.name != "name"}
        if "activation" in values:
            if values["activation"] not in _ACT_FROM_PROTO:
                raise SpecError(f"layer {index} ({kind}): unknown activation {values['activation']}")
            values["activation"] = _ACT_FROM_PROTO[values["activation"]]
        if "padding" in values:
            if values["padding"] not in _PAD_FROM_PROTO:
                raise SpecError(f"layer {index} ({kind}): unknown padding {values['padding']}")
            values["padding"] = _PAD_FROM_PROTO[values["padding"]]
        if kind == "batchnorm":  # proto3 has no presence: 0 means the default
            values["eps"] = values["eps"] or BatchNorm.eps
            values["momentum"] = values["momentum"] or BatchNorm.momentum
        layers.append(KINDS[kind](name=entry.name, **values))
    spec = ModelSpec(message.name or "custom", tuple(layers))
    validate(spec)
    return spec
