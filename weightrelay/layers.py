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
`.running_var` [channels] (the last two are buffers); activations flow as N, C, H, W, and a
flatten orders features C, H, W.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from weightrelay.reference import batchnorm, conv2d_nchw, maxpool2d_nchw
from weightrelay.codec import TensorSpec
from weightrelay.v1 import worker_pb2 as pb

ACTIVATIONS = ("none", "relu", "tanh", "sigmoid")
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

    kind: ClassVar[str]  # its name: TOML `kind`, the LayerSpec oneof field
    prefix: ClassVar[str]  # default names: prefix and count by kind (fc1, conv1, ...)
    message: ClassVar[type]  # its message in worker.proto
    #: applied after the layer; kinds that take one declare it as a field (not annotated here, so that
    #: theirs keeps its place among their own fields)
    activation = "none"

    @classmethod
    def settings(cls) -> tuple[Field, ...]:
        """The kind's own fields (all but `name`), in their order."""
        return tuple(f for f in fields(cls) if f.name != "name")

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
        """e.g. "conv1 conv2d 6@5x5/1 same relu [6x28x28]"."""
        activation = f" {self.activation}" if self.activation != "none" else ""
        return f"{self.name} {self.summary(r)}{activation} [{'x'.join(map(str, r.output_shape))}]"

    # -- its forms: dict (TOML) and proto
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in self.settings()}, "name": self.name}

    @classmethod
    def from_dict(cls: type[L], values: Mapping[str, Any]) -> L:
        """From a TOML table's keys (without `kind`); values are checked by `check`."""
        allowed = {f.name for f in fields(cls)}
        extra = set(values) - allowed
        if extra:
            raise LayerError(f"unknown key(s) {', '.join(sorted(extra))}; {cls.kind} takes {', '.join(sorted(allowed))}")
        return cls(**values)

    def to_proto(self) -> pb.LayerSpec:
        settings = {f.name: f.metadata["rule"].to_proto(getattr(self, f.name)) for f in self.settings()}
        return pb.LayerSpec(name=self.name, **{self.kind: self.message(**settings)})

    @classmethod
    def from_proto(cls: type[L], entry: pb.LayerSpec) -> L:
        part = getattr(entry, cls.kind)
        return cls(name=entry.name, **{f.name: f.metadata["rule"].from_proto(f.name, getattr(part, f.name)) for f in cls.settings()})


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
        x = self.one(inputs)
        if len(x.shape) != 1:
            raise LayerError(f"a dense layer needs flat input, got {list(x.shape)}; put a flatten before it")
        units = self.units or classes
        return ResolvedLayer(self, tuple(inputs), Flow((units,)), (self.tensor("weight", (units, x.shape[0])), self.tensor("bias", (units,))))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return x @ tensors["weight"].T + tensors["bias"]

    def summary(self, r: ResolvedLayer) -> str:
        return f"dense {r.output_shape[0]}"


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


@register("maxpool2d", prefix="pool", message=pb.MaxPool2DLayer)
@dataclass(frozen=True)
class MaxPool2D(Layer):
    """Square max pooling without padding; `stride = 0` is the pool size."""

    size: int = option(2, Whole(1))
    stride: int = option(0, Whole(0))

    @property
    def step(self) -> int:
        return self.stride or self.size

    def resolve(self, inputs: Sequence[Flow], classes: int) -> ResolvedLayer:
        x = self.one(inputs)
        if len(x.shape) != 3:
            raise LayerError(f"maxpool2d needs (C, H, W) input, got {list(x.shape)}")
        c, h, w = x.shape
        if self.size > h or self.size > w:
            raise LayerError(f"pool size {self.size} is larger than the input {list(x.shape)}")
        return ResolvedLayer(self, tuple(inputs), Flow((c, (h - self.size) // self.step + 1, (w - self.size) // self.step + 1)))

    def reference(self, r, tensors, inputs):
        (x,) = inputs
        return maxpool2d_nchw(x, self.size, self.step)

    def summary(self, r: ResolvedLayer) -> str:
        return f"maxpool2d {self.size}/{self.step}"


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
