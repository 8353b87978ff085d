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
    ACTIVATIONS, CLASSES, INPUT, KINDS, PADDINGS, Add, AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, Flow,
    GlobalAvgPool2D, Layer, LayerError, LayerNorm, MaxPool2D, MultiHeadAttention, PositionEmbedding, ResolvedLayer, SpecError,
    TokenMean, Tokens, at, kind_class, label, same_padding,
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


def resnet20() -> ModelSpec:
    """He et al.'s CIFAR ResNet-20 (any input size): a 3x3 conv of 16 with batchnorm and relu, three stages of three
    basic blocks (conv-bn-relu-conv-bn, added to the block's input, relu) of 16, 32 and 64 filters; the first block
    of stages 2 and 3 halves the size with stride 2 and takes its shortcut through a 1x1 conv with stride 2 and
    a batchnorm; then the global average pool and a dense layer of the classes."""
    layers: list[Layer] = [Conv2D(16, 3, padding="same", name="stem"), BatchNorm(activation="relu", name="stem_bn")]
    previous = "stem_bn"
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, 4):
            at_ = f"s{stage}b{block}"
            stride = 2 if stage > 1 and block == 1 else 1
            layers += [Conv2D(filters, 3, stride, "same", name=f"{at_}_conv1"), BatchNorm(activation="relu", name=f"{at_}_bn1"),
                       Conv2D(filters, 3, padding="same", name=f"{at_}_conv2"), BatchNorm(name=f"{at_}_bn2")]
            shortcut = previous
            if stride != 1:
                layers += [Conv2D(filters, 1, stride, "same", name=f"{at_}_proj", inputs=(previous,)), BatchNorm(name=f"{at_}_proj_bn")]
                shortcut = f"{at_}_proj_bn"
            layers.append(Add("relu", name=f"{at_}_add", inputs=(f"{at_}_bn2", shortcut)))
            previous = f"{at_}_add"
    return ModelSpec("resnet20", (*layers, GlobalAvgPool2D(name="pool"), Dense(CLASSES, name="head")))


def vit_patch(input_shape: tuple[int, ...] | None) -> int:
    """vit-tiny's patch size for an input (C, H, W): 7 where 7 divides H and W (28x28: 4x4 patches), else 4 (32x32: 8x8)."""
    if input_shape is None or (input_shape[1] % 7 == 0 and input_shape[2] % 7 == 0):
        return 7
    return 4


def vit_tiny(input_shape: tuple[int, ...] | None = None) -> ModelSpec:
    """A small vision transformer of 64 features: patches through a conv of kernel = stride = the patch (`vit_patch`),
    tokens, a position embedding, two pre-norm blocks (layernorm, attention of 4 heads, residual add; layernorm,
    dense 128 gelu, dense 64, residual add), a final layernorm, the tokens' mean and a dense layer of the classes."""
    patch, features = vit_patch(input_shape), 64
    layers: list[Layer] = [Conv2D(features, patch, patch, name="patch"), Tokens(name="tokens"), PositionEmbedding(name="pos")]
    previous = "pos"
    for block in (1, 2):
        at_ = f"block{block}"
        layers += [LayerNorm(name=f"{at_}_ln1"), MultiHeadAttention(4, name=f"{at_}_attn"),
                   Add(name=f"{at_}_add1", inputs=(previous, f"{at_}_attn")),
                   LayerNorm(name=f"{at_}_ln2"), Dense(128, "gelu", name=f"{at_}_mlp1"), Dense(features, name=f"{at_}_mlp2"),
                   Add(name=f"{at_}_add2", inputs=(f"{at_}_add1", f"{at_}_mlp2"))]
        previous = f"{at_}_add2"
    return ModelSpec("vit-tiny", (*layers, LayerNorm(name="ln"), TokenMean(name="mean"), Dense(CLASSES, name="head")))


BUILTINS = {"mlp": mlp, "lenet": lenet, "cnn-bn": cnn_bn, "resnet20": resnet20, "vit-tiny": vit_tiny}
#: built-ins whose layers depend on the input's shape: name -> the spec for an input (C, H, W) (None: the default one)
BY_INPUT = {"vit-tiny": vit_tiny}
BUILTIN_HELP = "mlp (the default: 784-128-64-10), mlp:W1,W2,... (hidden widths), lenet, cnn-bn, resnet20, vit-tiny, or a FILE.toml"
DEFAULT_MODEL = "mlp"


def builtin(name: str) -> ModelSpec:
    """A built-in spec by name: `mlp`, `mlp:W1,W2,...`, `lenet`, `cnn-bn`, `resnet20`, `vit-tiny`."""
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
    """Check each layer's own values and the form of its input names (shapes and the graph are checked by `resolve`)."""
    names = set()
    for index, layer in enumerate(spec.layers):
        if not isinstance(layer, Layer) or KINDS.get(getattr(layer, "kind", None)) is not type(layer):
            raise SpecError(f"layer {index}: {type(layer).__name__} is not a layer kind")
        where = label(index, layer.kind, layer.name)
        if layer.name:
            if not _NAME.match(layer.name):
                raise SpecError(f"{where}: name {layer.name!r} must be letters, digits and _ (not starting with a digit), at most 64")
            if layer.name == INPUT:
                raise SpecError(f"{where}: the name {INPUT!r} means the model's input in `inputs`; call the layer something else")
            if layer.name in names:
                raise SpecError(f"{where}: the name {layer.name!r} is used twice")
            names.add(layer.name)
        for source in layer.inputs:
            if not isinstance(source, str) or not (_NAME.match(source)):
                raise SpecError(f"{where}: input {source!r} is not a layer name; name earlier layers, or {INPUT!r} for the model's input")
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
    """Walk the spec over one sample's shape (C, H, W); raise SpecError naming the layer that does not fit.

    Each layer takes the outputs of the layers its `inputs` name (by default the layer before it); only earlier
    layers may be named, so the walk in the spec's order meets every input before the layer that takes it, and
    every layer's output but the last must be taken by some later layer (a framework's graph would drop it)."""
    validate(spec)
    spec = spec.named()
    validate(spec)  # default names may clash with given ones
    shape = tuple(int(d) for d in input_shape)
    if spec.name in BY_INPUT and spec == BY_INPUT[spec.name]().named():
        spec = BY_INPUT[spec.name](shape).named()
    outputs = {INPUT: Flow(shape, source=INPUT)}
    resolved: list[ResolvedLayer] = []
    taken: set[str] = set()
    for index, layer in enumerate(spec.layers):
        sources = layer.inputs or ((spec.layers[index - 1].name if index else INPUT),)
        with at(label(index, layer.kind, layer.name)):
            inputs = tuple(_output(spec, index, source, outputs) for source in sources)
            r = layer.resolve(inputs, num_classes)
        resolved.append(replace(r, output=replace(r.output, source=layer.name)))
        outputs[layer.name] = resolved[-1].output
        taken.update(sources)
    for index, layer in enumerate(spec.layers[:-1]):
        if layer.name not in taken:
            raise SpecError(f"{label(index, layer.kind, layer.name)}: no later layer takes its output; name it in a later "
                            f"layer's inputs or remove it (the model's output is the last layer's)")
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


def _output(spec: ModelSpec, index: int, source: str, outputs: dict[str, Flow]) -> Flow:
    """The output that layer `index` takes by the name `source`; LayerError where that is no earlier layer."""
    if source in outputs:
        return outputs[source]
    later = {layer.name: i for i, layer in enumerate(spec.layers)}
    if source not in later:
        known = [INPUT, *(layer.name for layer in spec.layers[:index])]
        raise LayerError(f"input {source!r} names no layer; name one of the earlier layers ({', '.join(known)})")
    cycle = [source] if later[source] == index else _path(spec, later[source], spec.layers[index].name, later)
    if cycle is not None:
        raise LayerError(f"its inputs make a cycle ({' -> '.join([spec.layers[index].name, *cycle])}); a model's layers "
                         "may take only earlier layers' outputs")
    raise LayerError(f"input {source!r} is layer {later[source]}, which comes later; a layer takes only earlier layers' outputs, "
                     f"so move {source!r} before it")


def _path(spec: ModelSpec, start: int, goal: str, positions: dict[str, int]) -> list[str] | None:
    """The names from layer `start` back through the layers it takes to the layer named `goal`, or None."""
    stack, seen = [(start, [spec.layers[start].name])], set()
    while stack:
        index, path = stack.pop()
        if index in seen:
            continue
        seen.add(index)
        layer = spec.layers[index]
        for source in layer.inputs or ((spec.layers[index - 1].name,) if index else ()):
            if source == goal:
                return path + [goal]
            if source in positions:
                stack.append((positions[source], path + [source]))
    return None


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
