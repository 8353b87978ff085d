"""Layer kinds: each kind is one class that owns its whole life, and a registry finds it by name.

A kind's class holds its fields and their checks, how it resolves over its input(s) (the output
shape, and its parameter tensors in the canonical layout), how it describes itself, its numpy
reference computation (float64, N, C, H, W) and its proto and dict (TOML) forms. `KINDS` maps each
kind's name (TOML `kind`, the LayerSpec oneof field of worker.proto) to its class; `weightrelay.models`
loops over a spec's layers and dispatches through these classes.

A new kind is one class here, registered with `@register(kind, prefix, message)` (and its message
in worker.proto's LayerSpec), one builder in each adapter's BUILDERS table, and its layout in the tables of
`weightrelay.layouts`, `keras_service.layout` and `jax_service.layout`; tests/unit/test_models.py
checks that every table covers every registered kind.

Canonical layout (see worker.proto): dense `<name>.weight` [out, in]; conv2d `<name>.weight`
[out, in, kh, kw]; `<name>.bias` [out]; batchnorm `.weight`, `.bias`, `.running_mean`,
`.running_var` [channels] (the last two are buffers); layernorm `.weight`, `.bias` [features];
position_embedding `.weight` [tokens, features]; multihead_attention PyTorch's `.in_proj_weight`
[3D, D], `.in_proj_bias` [3D], `.out_proj.weight` [D, D], `.out_proj.bias` [D]. Activations flow as
N, C, H, W, a flatten orders features C, H, W, and tokens flow as N, tokens, features.

A model is a graph: a layer takes the outputs of the layers its `inputs` name (earlier layers only,
or "input", the model's input), by default the layer before it; `weightrelay.models.resolve` walks it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from weightrelay.reference import INPUT, attention, avgpool2d_nchw, batchnorm, conv2d_nchw, layernorm, maxpool2d_nchw
from weightrelay.codec import TensorSpec
from weightrelay.v1 import worker_pb2 as pb

#: "gelu" is the exact form (with the error function), "gelu_tanh" the tanh approximation: named apart, so
#: that no framework's default form (Flax's is the approximation) stands in for the other
ACTIVATIONS = ("none", "relu", "tanh", "sigmoid", "gelu", "gelu_tanh")
PADDINGS = ("valid", "same")
#: `units = 0` in a dense layer: one unit per class of the data set (the output layer).
CLASSES = 0

T = TypeVar("T")
L = TypeVar("L", bound="Layer")


class SpecError(ValueError):
    """A model spec is malformed or does not fit the data set; the message names the layer and the fix."""


class LayerError(SpecError):
    """What is wrong with one layer, and the fix; `at` prefixes which layer it is."""


@contextmanager
def at(where: str) -> Iterator[None]:
    """Turn a LayerError raised inside into a SpecError that starts with `where` (e.g. "layer 2 (dense fc1)")."""
    try:
        yield
    except LayerError as exc:
        raise SpecError(f"{where}: {exc}") from None


def label(index: int, kind: str, name: str = "") -> str:
    """How errors name a layer: its position, its kind and its name where it has one."""
    return f"layer {index} ({kind}{' ' + name if name else ''})"


# -- a field's rule: its check, and its value on the wire -------------------------------------
class Rule:
    """What a value of one field may be; on the wire it is the value itself unless a rule says otherwise."""

    def check(self, name: str, value: Any) -> None:
        raise NotImplementedError

    def to_proto(self, value: Any) -> Any:
        return value

    def from_proto(self, name: str, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Whole(Rule):
    """A whole number of at least `minimum` (a bool is not one)."""

    minimum: int

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise LayerError(f"{name} must be a whole number of at least {self.minimum}, got {value!r}")


@dataclass(frozen=True)
class Fraction(Rule):
    """A finite number in [0, 1), or in (0, 1) where `low_open`."""

    low_open: bool

    def check(self, name: str, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not ((0 < value if self.low_open else 0 <= value) and value < 1):
            raise LayerError(f"{name} must be a number in {'(0' if self.low_open else '[0'}, 1), got {value!r}")


@dataclass(frozen=True)
class Choice(Rule):
    """One of `options`; on the wire the value of `enum` named PREFIX_OPTION (e.g. ACTIVATION_RELU)."""

    options: tuple[str, ...]
    enum: Any  # a protobuf enum type
    prefix: str

    def check(self, name: str, value: Any) -> None:
        if value not in self.options:
            raise LayerError(f"{name} {value!r} is not one of {', '.join(self.options)}")

    def to_proto(self, value: str) -> int:
        return self.enum.Value(f"{self.prefix}_{value.upper()}")

    def from_proto(self, name: str, value: int) -> str:
        for option in self.options:
            if self.to_proto(option) == value:
                return option
        raise LayerError(f"unknown {name} {value}")


ACTIVATION = Choice(ACTIVATIONS, pb.Activation, "ACTIVATION")
PADDING = Choice(PADDINGS, pb.Padding, "PADDING")


def option(default: Any, rule: Rule) -> Any:
    """A layer's field: its default and its rule."""
    return field(default=default, metadata={"rule": rule})


# -- what flows between layers, and a layer resolved over it ----------------------------------
@dataclass(frozen=True)
class Flow:
    """What flows into or out of a layer, per sample: its shape, and where its features were flattened.

    `flattened_from` is the (C, H, W) whose flatten gave these flat features, in C, H, W order; the
    channels-last frameworks hold them in H, W, C order, so a layer with per-feature tensors over them
    (a dense kernel's rows) is permuted there. Layers that keep the features' order pass it on."""

    shape: tuple[int, ...]
    flattened_from: tuple[int, int, int] | None = None
    #: the layer whose output it is ("input": the model's input), for messages
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class ResolvedLayer:
    """One layer over its inputs: its output, its tensors in the canonical layout, and the zero padding
    (top, bottom, left, right) it applies to its spatial input (conv2d's TensorFlow-style SAME)."""

    layer: "Layer"
    inputs: tuple[Flow, ...]
    output: Flow
    params: tuple[TensorSpec, ...] = ()
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The (first) input's shape, per sample: (C, H, W) or (features,)."""
        return self.inputs[0].shape

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(flow.shape for flow in self.inputs)

    @property
    def sources(self) -> tuple[str, ...]:
        """The names of the layers whose outputs it takes, in order ("input": the model's input)."""
        return tuple(flow.source for flow in self.inputs)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.output.shape

    @property
    def flattened_from(self) -> tuple[int, int, int] | None:
        """The (C, H, W) the (first) input's features were flattened from, or None (see Flow)."""
        return self.inputs[0].flattened_from

    def part(self, spec: TensorSpec) -> str:
        """A tensor's part of this layer: "weight" for "fc1.weight"."""
        return spec.name[len(self.name) + 1 :]

    def tensors(self, weights: Mapping[str, T]) -> dict[str, T]:
        """This layer's tensors by part ({"weight": ..., "bias": ...}) from a whole set by name."""
        return {self.part(spec): weights[spec.name] for spec in self.params}

    def named(self, parts: Mapping[str, T]) -> dict[str, T]:
        """The inverse of `tensors`: by canonical name, in the manifest's order; every part must be given."""
        return {spec.name: parts[self.part(spec)] for spec in self.params}

    def describe(self) -> str:
        return self.layer.describe(self)


# -- the kinds --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """A layer kind. Subclasses are frozen dataclasses registered with `register`: their fields (made with
    `option`) are the kind's settings, and they implement `resolve` and `reference` (and `summary` where
    the kind's name alone does not describe it); everything else here works for every kind."""

    name: str = field(default="", kw_only=True)
    #: the layers whose outputs it takes, by name ("input": the model's); () is the layer before it
    inputs: tuple[str, ...] = field(default=(), kw_only=True)

    kind: ClassVar[str]  # its name: TOML `kind`, the LayerSpec oneof field
    prefix: ClassVar[str]  # default names: prefix and count by kind (fc1, conv1, ...)
    message: ClassVar[type]  # its message in worker.proto
    #: applied after the layer; kinds that take one declare it as a field (not annotated here, so that
    #: theirs keeps its place among their own fields)
    activation = "none"

    @classmethod
    def settings(cls) -> tuple[Field, ...]:
        """The kind's own fields (all but `name` and `inputs`), in their order."""
        return tuple(f for f in fields(cls) if f.name not in ("name", "inputs"))

    # -- checks and resolution
    def check(self) -> None:
        """Each setting by its rule, the activation first; LayerError names the field and the fix."""
        for f in sorted(self.settings(), key=lambda f: f.name != "activation"):
            f.metadata["rule"].check(f.name, getattr(self, f.name))

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        """This layer over its inputs (per sample; for now the previous layer's output) for a data set of
        `classes` classes: its output and its tensors. LayerError where the inputs do not fit."""
        raise NotImplementedError

    def tensor(self, part: str, shape: Sequence[int], buffer: bool = False) -> TensorSpec:
        """One of its float32 tensors, named <layer>.<part>."""
        return TensorSpec(f"{self.name}.{part}", "float32", tuple(int(d) for d in shape), buffer)

    @staticmethod
    def one(inputs: Sequence[Flow]) -> Flow:
        """The input of a kind that takes one."""
        if len(inputs) != 1:
            raise LayerError(f"takes one input, got {len(inputs)}")
        return inputs[0]

    # -- what it computes and how it reads
    def reference(self, r: ResolvedLayer, tensors: Mapping[str, np.ndarray], inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Its output in float64 numpy from its definition (before the activation), in inference mode, N, C, H, W,
        from its canonical tensors by part; the ground truth that every framework's builder is tested against."""
        raise NotImplementedError

    def summary(self, r: ResolvedLayer) -> str:
        """What it is, for `describe`: e.g. "conv2d 6@5x5/1 same"."""
        return self.kind

    def describe(self, r: ResolvedLayer) -> str:
        """e.g. "conv1 conv2d 6@5x5/1 same relu [6x28x28]"; the layers it takes where it names them
        ("add1 add (conv2 + bn1) relu [16x28x28]")."""
        activation = f" {self.activation}" if self.activation != "none" else ""
        taken = f" ({' + '.join(r.sources)})" if self.inputs else ""
        return f"{self.name} {self.summary(r)}{taken}{activation} [{'x'.join(map(str, r.output_shape))}]"

    # -- its forms: dict (TOML) and proto
    def to_dict(self) -> dict[str, Any]:
        """`inputs` only where given, so that a stack's form is what it was before graphs."""
        named = {"inputs": list(self.inputs)} if self.inputs else {}
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in self.settings()}, "name": self.name, **named}

    @classmethod
    def from_dict(cls: type[L], values: Mapping[str, Any]) -> L:
        """From a TOML table's keys (without `kind`); values are checked by `check`."""
        allowed = {f.name for f in fields(cls)}
        extra = set(values) - allowed
        if extra:
            raise LayerError(f"unknown key(s) {', '.join(sorted(extra))}; {cls.kind} takes {', '.join(sorted(allowed))}")
        if "inputs" in values:
            given = values["inputs"]
            if not isinstance(given, (list, tuple)) or not given or not all(isinstance(n, str) for n in given):
                raise LayerError(f"inputs must be a list of layer names, e.g. inputs = [\"conv1\", \"bn3\"], got {given!r}")
            values = {**values, "inputs": tuple(given)}
        return cls(**values)

    def to_proto(self) -> pb.LayerSpec:
        settings = {f.name: f.metadata["rule"].to_proto(getattr(self, f.name)) for f in self.settings()}
        return pb.LayerSpec(name=self.name, inputs=list(self.inputs), **{self.kind: self.message(**settings)})

    @classmethod
    def from_proto(cls: type[L], entry: pb.LayerSpec) -> L:
        part = getattr(entry, cls.kind)
        return cls(name=entry.name, inputs=tuple(entry.inputs), **{f.name: f.metadata["rule"].from_proto(f.name, getattr(part, f.name)) for f in cls.settings()})


#: kind name -> its class, in the order errors list them
KINDS: dict[str, type[Layer]] = {}


def register(kind: str, prefix: str, message: type) -> Callable[[type[L]], type[L]]:
    """A class decorator that makes a Layer subclass the kind `kind` in KINDS: its layers are named
    `prefix`1, `prefix`2, ... by default, and `message` is its message in worker.proto's LayerSpec."""

    def add(cls: type[L]) -> type[L]:
        if kind in KINDS:
            raise ValueError(f"layer kind {kind!r} is registered twice")
        cls.kind, cls.prefix, cls.message = kind, prefix, message
        KINDS[kind] = cls
        return cls

    return add


def kind_class(kind: Any) -> type[Layer]:
    """A kind's class by its name (any case); LayerError naming the kind and the known ones where there is none."""
    cls = KINDS.get(str(kind).lower())
    if cls is None:
        raise LayerError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    return cls


@register("dense", prefix="fc", message=pb.DenseLayer)
@dataclass(frozen=True)
class Dense(Layer):
    """Fully connected: `weight` [units, in], `bias` [units]; `units = 0` is one unit per class."""

    units: int = option(CLASSES, Whole(0))
    activation: str = option("none", ACTIVATION)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Dense":
        """`units = "classes"` reads as 0, one unit per class."""
        return super().from_dict({**values, "units": CLASSES} if values.get("units") == "classes" else values)

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        """On flat features, or on tokens (tokens, features): then applied to each token's features."""
        x = self.one(inputs)
        if len(x.shape) not in (1, 2):
            raise LayerError(f"a dense layer needs flat input or tokens, got {list(x.shape)}; put a flatten (or tokens) before it")
        units = self.units or classes
        params = (self.tensor("weight", (units, x.shape[-1])), self.tensor("bias", (units,)))
        return ResolvedLayer(self, tuple(inputs), Flow((*x.shape[:-1], units)), params)

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x @ tensors["weight"].T + tensors["bias"]

    def summary(self, r: ResolvedLayer) -> str:
        return f"dense {r.output_shape[-1]}"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: output ceil(size / stride), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@register("conv2d", prefix="conv", message=pb.Conv2DLayer)
@dataclass(frozen=True)
class Conv2D(Layer):
    """A square convolution: `weight` [filters, in, kernel, kernel] (OIHW), `bias` [filters]; "same" padding is
    TensorFlow's (the odd pixel after), which the resolved layer's `padding` spells out for every framework."""

    filters: int = option(1, Whole(1))
    kernel: int = option(3, Whole(1))
    stride: int = option(1, Whole(1))
    padding: str = option("valid", PADDING)
    activation: str = option("none", ACTIVATION)

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 3:
            raise LayerError(f"conv2d needs (C, H, W) input, got {list(x.shape)}")
        c, h, w = x.shape
        padding = (0, 0, 0, 0)
        if self.padding == "same":
            padding = same_padding(h, self.kernel, self.stride) + same_padding(w, self.kernel, self.stride)
        top, bottom, left, right = padding
        oh = (h + top + bottom - self.kernel) // self.stride + 1
        ow = (w + left + right - self.kernel) // self.stride + 1
        if oh < 1 or ow < 1:
            raise LayerError(f"a {self.kernel}x{self.kernel} kernel does not fit input {list(x.shape)}; use padding \"same\" or a smaller kernel")
        params = (self.tensor("weight", (self.filters, c, self.kernel, self.kernel)), self.tensor("bias", (self.filters,)))
        return ResolvedLayer(self, tuple(inputs), Flow((self.filters, oh, ow)), params, padding)

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return conv2d_nchw(x, tensors["weight"], tensors["bias"], self.stride, r.padding)

    def summary(self, r: ResolvedLayer) -> str:
        return f"conv2d {self.filters}@{self.kernel}x{self.kernel}/{self.stride} {self.padding}"


@dataclass(frozen=True)
class Pool2D(Layer):
    """Square pooling without padding (a base, not a kind); `stride = 0` is the pool size."""

    size: int = option(2, Whole(1))
    stride: int = option(0, Whole(0))

    @property
    def step(self) -> int:
        return self.stride or self.size

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 3:
            raise LayerError(f"{self.kind} needs (C, H, W) input, got {list(x.shape)}")
        c, h, w = x.shape
        if self.size > h or self.size > w:
            raise LayerError(f"pool size {self.size} is larger than the input {list(x.shape)}")
        return ResolvedLayer(self, tuple(inputs), Flow((c, (h - self.size) // self.step + 1, (w - self.size) // self.step + 1)))

    def summary(self, r: ResolvedLayer) -> str:
        return f"{self.kind} {self.size}/{self.step}"


@register("maxpool2d", prefix="pool", message=pb.MaxPool2DLayer)
@dataclass(frozen=True)
class MaxPool2D(Pool2D):
    """Square max pooling without padding; `stride = 0` is the pool size."""

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return maxpool2d_nchw(x, self.size, self.step)


@register("flatten", prefix="flatten", message=pb.FlattenLayer)
@dataclass(frozen=True)
class Flatten(Layer):
    """Flat features in C, H, W order (the canonical one; channels-last frameworks flatten H, W, C)."""

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        flattened_from = x.shape if len(x.shape) == 3 else x.flattened_from  # flat input keeps its order
        return ResolvedLayer(self, tuple(inputs), Flow((int(math.prod(x.shape)),), flattened_from))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x.reshape(len(x), -1)


@register("batchnorm", prefix="bn", message=pb.BatchNormLayer)
@dataclass(frozen=True)
class BatchNorm(Layer):
    """Normalises over the channel axis (axis 1; a flat input's features): `weight`, `bias` and the buffers
    `running_mean`, `running_var` [channels]. `momentum` is PyTorch's: the weight of the new batch
    statistic in the running average (Keras' momentum is 1 - this); `eps` is added to the variance."""

    eps: float = option(1e-5, Fraction(low_open=True))
    momentum: float = option(0.1, Fraction(low_open=True))
    activation: str = option("none", ACTIVATION)

    @classmethod
    def from_proto(cls, entry: pb.LayerSpec) -> "BatchNorm":
        """proto3 has no presence: 0 means the default."""
        layer = super().from_proto(entry)
        return replace(layer, eps=layer.eps or cls.eps, momentum=layer.momentum or cls.momentum)

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) == 2:
            raise LayerError(f"batchnorm on tokens {list(x.shape)} would normalise over tokens in one framework and over "
                             "features in another; use a layernorm")
        c_h_w = x.flattened_from
        if c_h_w is not None and c_h_w[0] > 1 and c_h_w[1] * c_h_w[2] > 1:
            raise LayerError(f"a batchnorm right after flattening {list(c_h_w)} would normalise features whose order "
                             "differs between frameworks; put it before the flatten or after a dense layer")
        channels = x.shape[0]
        params = (self.tensor("weight", (channels,)), self.tensor("bias", (channels,)),
                  self.tensor("running_mean", (channels,), buffer=True), self.tensor("running_var", (channels,), buffer=True))
        return ResolvedLayer(self, tuple(inputs), x, params)

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        stats = (tensors[part] for part in ("weight", "bias", "running_mean", "running_var"))
        return batchnorm(x, *stats, self.eps)

    def summary(self, r: ResolvedLayer) -> str:
        return f"batchnorm eps={self.eps:g} momentum={self.momentum:g}"


@register("dropout", prefix="dropout", message=pb.DropoutLayer)
@dataclass(frozen=True)
class Dropout(Layer):
    """Zeroes a `rate` of its inputs while training (scaling the rest); the identity at evaluation."""

    rate: float = option(0.5, Fraction(low_open=False))

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        return ResolvedLayer(self, tuple(inputs), self.one(inputs))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x

    def summary(self, r: ResolvedLayer) -> str:
        return f"dropout {self.rate:g}"


# -- graphs, and the kinds of residual networks and transformers ------------------------------
@register("add", prefix="add", message=pb.AddLayer)
@dataclass(frozen=True)
class Add(Layer):
    """The sum of two or more inputs of one shape (a residual connection), then its activation."""

    activation: str = option("none", ACTIVATION)

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        if len(inputs) < 2:
            raise LayerError(f"add takes two or more inputs, got {len(inputs)}; name them, e.g. inputs = [\"conv2\", \"bn1\"]")
        first = inputs[0]
        for other in inputs[1:]:
            if other.shape != first.shape:
                raise LayerError(f"its inputs disagree in shape: {first.source} gives {list(first.shape)}, {other.source} gives "
                                 f"{list(other.shape)}; give the shortcut a layer that makes them agree (a 1x1 conv2d with the stride)")
            if other.flattened_from != first.flattened_from:
                raise LayerError(f"its inputs {first.source} and {other.source} order their features differently (one was "
                                 "flattened from (C, H, W), whose order differs between frameworks); add them before the flatten")
        return ResolvedLayer(self, tuple(inputs), replace(first, source=""))

    def reference(self, r, tensors, inputs):
        return sum(inputs[1:], inputs[0])


@register("avgpool2d", prefix="avgpool", message=pb.AvgPool2DLayer)
@dataclass(frozen=True)
class AvgPool2D(Pool2D):
    """Square average pooling without padding (every window is whole, so no framework's padding rule enters);
    `stride = 0` is the pool size."""

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return avgpool2d_nchw(x, self.size, self.step)


@register("global_avgpool2d", prefix="gap", message=pb.GlobalAvgPool2DLayer)
@dataclass(frozen=True)
class GlobalAvgPool2D(Layer):
    """The mean over H and W of each channel: (C, H, W) -> (C,), features in channel order in every framework."""

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 3:
            raise LayerError(f"global_avgpool2d needs (C, H, W) input, got {list(x.shape)}")
        return ResolvedLayer(self, tuple(inputs), Flow((x.shape[0],)))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x.mean(axis=(2, 3))


@register("layernorm", prefix="ln", message=pb.LayerNormLayer)
@dataclass(frozen=True)
class LayerNorm(Layer):
    """Normalises each sample's (each token's) features over the last axis with the biased variance:
    `weight`, `bias` [features]. `eps` is always the spec's (frameworks' defaults differ: 1e-5, 1e-3, 1e-6)."""

    eps: float = option(1e-5, Fraction(low_open=True))

    @classmethod
    def from_proto(cls, entry: pb.LayerSpec) -> "LayerNorm":
        """proto3 has no presence: 0 means the default."""
        layer = super().from_proto(entry)
        return replace(layer, eps=layer.eps or cls.eps)

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) not in (1, 2):
            raise LayerError(f"layernorm needs tokens or flat features, got {list(x.shape)}; put a tokens layer (or a flatten) before it")
        c_h_w = x.flattened_from
        if c_h_w is not None and c_h_w[0] > 1 and c_h_w[1] * c_h_w[2] > 1:
            raise LayerError(f"a layernorm right after flattening {list(c_h_w)} would scale features whose order differs "
                             "between frameworks; put it after a dense layer")
        features = x.shape[-1]
        return ResolvedLayer(self, tuple(inputs), x, (self.tensor("weight", (features,)), self.tensor("bias", (features,))))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return layernorm(x, tensors["weight"], tensors["bias"], self.eps)

    def summary(self, r: ResolvedLayer) -> str:
        return f"layernorm eps={self.eps:g}"


@register("tokens", prefix="tokens", message=pb.TokensLayer)
@dataclass(frozen=True)
class Tokens(Layer):
    """(C, H, W) -> (H*W, C): one token per pixel, row-major over H, W, its features the channels."""

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 3:
            raise LayerError(f"tokens needs (C, H, W) input, got {list(x.shape)}; put it after a conv2d (e.g. the patch embedding)")
        c, h, w = x.shape
        return ResolvedLayer(self, tuple(inputs), Flow((h * w, c)))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)


@register("position_embedding", prefix="pos", message=pb.PositionEmbeddingLayer)
@dataclass(frozen=True)
class PositionEmbedding(Layer):
    """Adds a learned table `weight` [tokens, features] to the tokens."""

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 2:
            raise LayerError(f"position_embedding needs tokens (tokens, features), got {list(x.shape)}; put a tokens layer before it")
        return ResolvedLayer(self, tuple(inputs), x, (self.tensor("weight", x.shape),))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x + tensors["weight"]


@register("multihead_attention", prefix="attn", message=pb.MultiHeadAttentionLayer)
@dataclass(frozen=True)
class MultiHeadAttention(Layer):
    """Self-attention over the tokens, softmax scale 1/sqrt(head_dim), no dropout, with PyTorch's tensors:
    `in_proj_weight` [3D, D] (the q, k and v projections stacked, in that order), `in_proj_bias` [3D],
    `out_proj.weight` [D, D], `out_proj.bias` [D]; head h takes features h*head_dim .. (h+1)*head_dim - 1."""

    heads: int = option(1, Whole(1))

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 2:
            raise LayerError(f"multihead_attention needs tokens (tokens, features), got {list(x.shape)}; put a tokens layer before it")
        d = x.shape[1]
        if d % self.heads:
            divisors = [h for h in range(1, d + 1) if d % h == 0]
            raise LayerError(f"{self.heads} heads do not divide the {d} features; use heads = one of {', '.join(map(str, divisors))}")
        params = (self.tensor("in_proj_weight", (3 * d, d)), self.tensor("in_proj_bias", (3 * d,)),
                  self.tensor("out_proj.weight", (d, d)), self.tensor("out_proj.bias", (d,)))
        return ResolvedLayer(self, tuple(inputs), x, params)

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return attention(x, tensors["in_proj_weight"], tensors["in_proj_bias"], tensors["out_proj.weight"], tensors["out_proj.bias"], self.heads)

    def summary(self, r: ResolvedLayer) -> str:
        return f"multihead_attention {self.heads} heads"


@register("token_mean", prefix="token_mean", message=pb.TokenMeanLayer)
@dataclass(frozen=True)
class TokenMean(Layer):
    """The mean over the tokens: (tokens, features) -> (features,)."""

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 2:
            raise LayerError(f"token_mean needs tokens (tokens, features), got {list(x.shape)}")
        return ResolvedLayer(self, tuple(inputs), Flow((x.shape[1],)))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x.mean(axis=1)
