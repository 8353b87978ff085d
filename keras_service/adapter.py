"""Model specs in Keras 3 on the TensorFlow backend (N, H, W, C); layouts are converted at this boundary."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Mapping  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_service.layout import canonical_to_keras, keras_to_canonical  # noqa: E402
from weightrelay.adapter import FrameworkAdapter, ProgressTracker, TrainConfig, schedule, seed32  # noqa: E402
from weightrelay.codec import WeightSet  # noqa: E402
from weightrelay.layouts import to_nhwc  # noqa: E402
from weightrelay.models import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ResolvedModel  # noqa: E402


def configure_devices(requested: str) -> None:
    """Hide GPUs for --device cpu; otherwise let TensorFlow grow GPU memory as needed."""
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "cuda" and not gpus:
        raise ValueError("--device cuda was asked for, but TensorFlow sees no GPU; use --device cpu or auto")
    if requested == "cpu":
        tf.config.set_visible_devices([], "GPU")
        return
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)


def _activation(name: str) -> str | None:
    return None if name == "none" else name


def build_model(model: ResolvedModel) -> keras.Model:
    """The spec as a Keras Sequential on N, H, W, C inputs; layers keep the spec's names."""
    c, h, w = model.input_shape
    layers: list = [keras.Input(shape=(h, w, c))]
    for r in model.layers:
        layer, name = r.layer, r.name
        if isinstance(layer, Dense):
            layers.append(keras.layers.Dense(r.output_shape[0], activation=_activation(layer.activation), name=name))
        elif isinstance(layer, Conv2D):
            layers.append(keras.layers.Conv2D(layer.filters, layer.kernel, strides=layer.stride, padding=layer.padding,
                                              activation=_activation(layer.activation), name=name))
        elif isinstance(layer, MaxPool2D):
            layers.append(keras.layers.MaxPooling2D(layer.size, strides=layer.stride or layer.size, padding="valid", name=name))
        elif isinstance(layer, Flatten):
            layers.append(keras.layers.Flatten(name=name))  # H, W, C order: the layout permutes the next kernel
        elif isinstance(layer, BatchNorm):
            layers.append(keras.layers.BatchNormalization(axis=-1, momentum=1.0 - layer.momentum, epsilon=layer.eps, name=name))
            if layer.activation != "none":
                layers.append(keras.layers.Activation(layer.activation, name=f"{name}_activation"))
        elif isinstance(layer, Dropout):
            layers.append(keras.layers.Dropout(layer.rate, name=name))
        else:
            raise TypeError(f"layer {name}: no Keras builder for {type(layer).__name__}")
    return keras.Sequential(layers, name="model")


#: Batches Keras runs per call of its compiled train function: the per-batch Python work of fit()
#: (callbacks, logs) cost more than the small models' steps themselves. Updates stay per batch.
STEPS_PER_EXECUTION = 32


class _ReportProgress(keras.callbacks.Callback):
    """Feeds one fit() call over the steps of one epoch (the first of them `first_batch`) to the tracker;
    Keras calls back once per STEPS_PER_EXECUTION batches, with the index of the last one."""

    def __init__(self, tracker: ProgressTracker, epoch: int, first_batch: int, last_batch: int):
        super().__init__()
        self.tracker, self.epoch, self.first_batch, self.last_batch = tracker, epoch, first_batch, last_batch
        self.next_batch = first_batch

    def on_train_batch_end(self, batch, logs=None):
        last = min(self.first_batch + batch, self.last_batch)  # Keras names a whole chunk's end, also past the data
        if self.tracker.batches_done(self.next_batch, last):  # Keras' logs are this fit's running means
            self.tracker.batch_done(self.epoch, last, float(logs["loss"]), float(logs["accuracy"]))
        self.next_batch = last + 1


class _InputTensor:
    """The last array given, in N, H, W, C as a TensorFlow tensor, made again only when another array comes.

    The worker hands over its data set (a new view of the same memory each call); Keras copied numpy
    inputs into fresh tensors on every fit and predict, 0.1 to 0.6 s an epoch for MNIST here.
    """

    def __init__(self) -> None:
        self._array: np.ndarray | None = None  # kept alive, so its memory cannot be another array's
        self._tensor: tf.Tensor | None = None

    def __call__(self, x: np.ndarray) -> tf.Tensor:
        if self._array is None or not (self._array is x or _same_view(self._array, x)):
            self._array, self._tensor = None, None  # let the previous one go first
            self._tensor = tf.constant(to_nhwc(x))
            self._array = x
        return self._tensor


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays show the same memory the same way (same base, address, shape, strides and dtype)."""
    base_a = a.base if a.base is not None else a
    base_b = b.base if b.base is not None else b
    return base_a is base_b and a.__array_interface__ == b.__array_interface__


class KerasAdapter(FrameworkAdapter):
    framework = "keras"

    def __init__(self, device: str = "auto") -> None:
        configure_devices(device)
        self.model: keras.Model | None = None
        self.resolved: ResolvedModel | None = None
        self._compiled_for: tuple[float, int] | None = None  # (momentum, steps per execution) of the compiled model
        self._train_inputs = _InputTensor()
        self._predict_inputs = _InputTensor()
        self._forward: tf.types.experimental.PolymorphicFunction | None = None  # the model's inference pass, traced once

    def build(self, model: ResolvedModel, seed: int) -> None:
        keras.utils.set_random_seed(seed32(seed))
        built = build_model(model)
        self.model, self.resolved, self._compiled_for, self._forward = built, model, None, None

    def _layers_with_tensors(self) -> list[str]:
        return [r.name for r in self.resolved.layers if r.params]

    def _variables(self) -> dict[str, list[tf.Variable]]:
        """{layer name: its weight variables as TensorFlow holds them} for the layers with tensors, each
        layer's in its `weights` order (what keras_to_canonical / canonical_to_keras list per layer).

        They are read and assigned with TensorFlow's own variable ops (ReadVariableOp, AssignVariableOp):
        Keras' layer.get_weights / set_weights took 0.6 and 1.4 ms for the seed's MLP here (conversions,
        checks, autocasting per variable), the ops 0.2 ms each way; a move into a Keras worker reads,
        sets and reads again (service._apply)."""
        return {name: [variable.value for variable in self.model.get_layer(name).weights] for name in self._layers_with_tensors()}

    def versions(self) -> tuple[str, str]:
        return keras.__version__, f"tensorflow {tf.__version__}"

    def device(self) -> str:
        # e.g. "/job:localhost/replica:0/task:0/device:GPU:0" -> "gpu:0"
        placed = self.model.weights[0].value.device
        return placed.rsplit("device:", 1)[-1].lower() if placed else "cpu:0"

    def get_weights(self) -> WeightSet:
        layers = {name: [tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype).numpy() for v in variables]
                  for name, variables in self._variables().items()}
        return keras_to_canonical(layers, self.resolved)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        layers = canonical_to_keras(weights, self.resolved)
        pairs = [pair for name, variables in self._variables().items() for pair in zip(variables, layers[name], strict=True)]
        for variable, value in pairs:  # all checked before any is assigned
            if tuple(value.shape) != tuple(variable.shape) or value.dtype != variable.dtype.as_numpy_dtype:
                raise ValueError(f"variable {variable.name}: expected {variable.dtype.name} {list(variable.shape)}, got {value.dtype} {list(value.shape)}")
        for variable, value in pairs:
            tf.raw_ops.AssignVariableOp(resource=variable.handle, value=value)

    def _touch_variables(self) -> None:
        """Read every weight variable and assign it what was read (its own value, nothing changes).

        After fit() the first read and the first assignment of each variable cost 0.4-0.7 ms, as if
        TensorFlow had dropped what it cached for them (measured here; the cause is TensorFlow's):
        3-5 ms more on the first move into the worker after each Train. Touched here, that is paid
        inside Train (a few ms of an epoch) instead of in the move."""
        for variable in (v for variables in self._variables().values() for v in variables):
            tf.raw_ops.AssignVariableOp(resource=variable.handle, value=tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=variable.dtype))

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        keras.utils.set_random_seed(seed32(config.seed + config.start_step))  # dropout
        self._prepare_optimizer(config)
        inputs, labels = self._train_inputs(x), tf.constant(y)
        for steps in schedule(config, len(x)):  # the core's batches, not Keras' shuffling
            tracker.start_epoch()
            index = tf.constant(np.concatenate([step.indices for step in steps]))  # full batches, a smaller one only at the epoch's end
            self.model.fit(tf.gather(inputs, index), tf.gather(labels, index), batch_size=config.batch_size, epochs=1, shuffle=False,
                           verbose=0, callbacks=[_ReportProgress(tracker, steps[0].epoch, steps[0].batch, steps[-1].batch)])
        self._touch_variables()

    def _prepare_optimizer(self, config: TrainConfig) -> None:
        """SGD at the config's rate: the previous Train's (keep_optimizer), or a fresh one.

        A fresh optimizer on a model compiled for the same momentum and pace is the compiled one with
        its state zeroed and the new rate set: compiling again would retrace the train and predict
        functions, about half a second a Train for the seed's MLP, every round of a relay.
        """
        # progress every N batches needs a call back at least every N batches
        pace = min(STEPS_PER_EXECUTION, config.progress_every_batches or STEPS_PER_EXECUTION)
        optimizer = self.model.optimizer if self.model.compiled else None
        if config.keep_optimizer and optimizer is not None:
            return
        if optimizer is not None and self._compiled_for == (config.momentum, pace):
            optimizer.learning_rate = config.learning_rate
            if optimizer.built:
                optimizer.iterations.assign(0)
                for slot in optimizer.momentums:
                    slot.assign(keras.ops.zeros(slot.shape, slot.dtype))
            return
        self.model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            steps_per_execution=pace,
        )
        self._compiled_for = (config.momentum, pace)

    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """The model's inference pass over `x` in batches, as predict() computes it without predict()'s own
        machinery (data adapter, iterator, callbacks): 25 ms instead of 70-90 for MNIST's test set here."""
        if self._forward is None:
            model = self.model
            batch = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
            self._forward = tf.function(lambda inputs: model(inputs, training=False), input_signature=[batch])
        inputs = self._predict_inputs(x)
        logits = [self._forward(inputs[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
        return np.concatenate(logits).astype(np.float32, copy=False) if logits else np.zeros((0,) + tuple(self.model.output_shape[1:]), np.float32)
