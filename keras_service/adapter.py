"""Model specs in Keras 3 on the TensorFlow backend (N, H, W, C); layouts are converted at this boundary."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Large tensors from the C library's allocator, not from the BFC pool of oneDNN's CPU allocator (TensorFlow's
# default on x86), which keeps the most it ever held: Keras' initializers of a 1 GiB model peak at three
# sets, and the worker would hold them for good. Only where the memory comes from changes, not the kernels
# TensorFlow computes with (TF_ENABLE_ONEDNN_OPTS=0 would change those); training measured as fast.
# Read once, when TensorFlow starts: set TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0 to have the pool back.
os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")

from typing import Any, Callable, Iterator, Mapping  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_service.layout import canonical_to_keras, keras_canonical_views, keras_into_canonical, keras_to_canonical  # noqa: E402
from weightrelay.adapter import FrameworkAdapter, ProgressTracker, Step, TrainConfig, schedule, seed32  # noqa: E402
from weightrelay.buffers import ALIGNMENT, same_view  # noqa: E402
from weightrelay.codec import TensorSpec, WeightSet  # noqa: E402
from weightrelay.conversion import BandConversion  # noqa: E402
from weightrelay.layouts import fresh_copy, to_nhwc, transposed_kernels  # noqa: E402
from weightrelay.transpose import TILED_TRANSPOSE_BYTES  # noqa: E402
from weightrelay.models import INPUT, ResolvedLayer, ResolvedModel  # noqa: E402


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


def host_view(tensor: tf.Tensor) -> np.ndarray:
    """A tensor's values as numpy: a read-only view of its memory where TensorFlow lends it (a tensor in host
    memory, through DLPack), else a copy (a GPU's tensor). Read before anything changes the tensor again."""
    try:
        return np.from_dlpack(tensor)
    except Exception:  # noqa: BLE001 - a tensor DLPack cannot lend to numpy (another device, an unsupported dtype)
        return tensor.numpy()


def _lendable(value: np.ndarray) -> bool:
    """Whether TensorFlow can take `value`'s memory as a tensor's (DLPack): C-contiguous and aligned to ALIGNMENT
    bytes (its kernels abort the process on less aligned memory)."""
    return value.flags.c_contiguous and value.ctypes.data % ALIGNMENT == 0


def owned_tensor(value: np.ndarray, device: str) -> tf.Tensor | np.ndarray:
    """`value` (a fresh array nothing else writes) as a tensor that shares its memory, where the variable to take
    it lives in host memory and TensorFlow can (_lendable): AssignVariableOp then keeps that tensor as the
    variable's own memory instead of copying it twice (into a tensor, then into the variable). Otherwise
    `value` itself, which TensorFlow copies."""
    if not (_lendable(value) and value.flags.writeable) or "GPU" in device.upper():
        return value
    try:
        return tf.experimental.dlpack.from_dlpack(value.__dlpack__())
    except Exception:  # noqa: BLE001 - a dtype DLPack does not carry: TensorFlow copies it
        return value


def transposed_tensor(matrix: np.ndarray) -> tf.Tensor:
    """matrix.T as a tensor in TensorFlow's own memory, by its multi-threaded transpose kernel, read straight
    from `matrix` where TensorFlow can (_lendable; else from a copy): for a large kernel the receive did not
    convert already (a set restored after a failed apply, say)."""
    source = matrix
    if _lendable(matrix):
        try:
            source = tf.experimental.dlpack.from_dlpack(matrix.__dlpack__())
        except Exception:  # noqa: BLE001 - a dtype DLPack does not carry
            source = matrix
    return tf.transpose(tf.convert_to_tensor(source))


def gelu(x):
    """The exact gelu (with the error function), whatever Keras' default form."""
    return keras.activations.gelu(x, approximate=False)


def gelu_tanh(x):
    """gelu's tanh approximation."""
    return keras.activations.gelu(x, approximate=True)


#: the spec's activation -> Keras' (by name where Keras' name means the same function)
ACTIVATIONS: dict[str, str | Callable | None] = {"none": None, "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "gelu": gelu, "gelu_tanh": gelu_tanh}


def _activation(name: str) -> str | Callable | None:
    return ACTIVATIONS[name]


def _then_activation(r: ResolvedLayer, x):
    """x, then the layer's activation as a layer of its own (for Keras layers that take none)."""
    if r.layer.activation == "none":
        return x
    return keras.layers.Activation(_activation(r.layer.activation), name=f"{r.name}_activation")(x)


# -- one builder per kind: applies the Keras layers (N, H, W, C) that compute it, named after the spec's layer,
# to its input (a kind of several inputs, add, gets the list of them) ------------------------------------------
def build_dense(r: ResolvedLayer, x):
    return keras.layers.Dense(r.output_shape[-1], activation=_activation(r.layer.activation), name=r.name)(x)


def build_conv2d(r: ResolvedLayer, x):
    layer = r.layer  # Keras' "same" is TensorFlow's SAME, the padding the spec resolves to
    return keras.layers.Conv2D(layer.filters, layer.kernel, strides=layer.stride, padding=layer.padding,
                               activation=_activation(layer.activation), name=r.name)(x)


def build_maxpool2d(r: ResolvedLayer, x):
    return keras.layers.MaxPooling2D(r.layer.size, strides=r.layer.step, padding="valid", name=r.name)(x)


def build_flatten(r: ResolvedLayer, x):
    return keras.layers.Flatten(name=r.name)(x)  # H, W, C order: the layout permutes the next kernel


def build_batchnorm(r: ResolvedLayer, x):
    layer = r.layer
    norm = keras.layers.BatchNormalization(axis=-1, momentum=1.0 - layer.momentum, epsilon=layer.eps, name=r.name)
    return _then_activation(r, norm(x))


def build_dropout(r: ResolvedLayer, x):
    return keras.layers.Dropout(r.layer.rate, name=r.name)(x)


def build_add(r: ResolvedLayer, xs):
    return _then_activation(r, keras.layers.Add(name=r.name)(list(xs)))


def build_avgpool2d(r: ResolvedLayer, x):
    return keras.layers.AveragePooling2D(r.layer.size, strides=r.layer.step, padding="valid", name=r.name)(x)


def build_global_avgpool2d(r: ResolvedLayer, x):
    return keras.layers.GlobalAveragePooling2D(name=r.name)(x)


def build_layernorm(r: ResolvedLayer, x):
    return keras.layers.LayerNormalization(axis=-1, epsilon=r.layer.eps, name=r.name)(x)


def build_tokens(r: ResolvedLayer, x):
    return keras.layers.Reshape(r.output_shape, name=r.name)(x)  # N, H, W, C -> N, H*W, C: row-major over H, W


class PositionEmbedding(keras.layers.Layer):
    """A learned table [tokens, features] added to every sample's tokens (keras.layers has no such layer)."""

    def build(self, input_shape):
        self.embedding = self.add_weight(shape=tuple(input_shape[1:]), initializer=keras.initializers.RandomNormal(stddev=0.02), name="embedding")

    def call(self, x):
        return x + self.embedding


def build_position_embedding(r: ResolvedLayer, x):
    return PositionEmbedding(name=r.name)(x)


def build_multihead_attention(r: ResolvedLayer, x):
    heads = r.layer.heads
    attention = keras.layers.MultiHeadAttention(heads, key_dim=r.input_shape[-1] // heads, dropout=0.0, name=r.name)
    return attention(x, x)


def build_token_mean(r: ResolvedLayer, x):
    return keras.layers.GlobalAveragePooling1D(name=r.name)(x)


#: kind -> its builder (every kind of weightrelay.layers.KINDS; tests/unit/test_models.py checks)
BUILDERS: dict[str, Callable[[ResolvedLayer, Any], Any]] = {
    "dense": build_dense,
    "conv2d": build_conv2d,
    "maxpool2d": build_maxpool2d,
    "flatten": build_flatten,
    "batchnorm": build_batchnorm,
    "dropout": build_dropout,
    "add": build_add,
    "avgpool2d": build_avgpool2d,
    "global_avgpool2d": build_global_avgpool2d,
    "layernorm": build_layernorm,
    "tokens": build_tokens,
    "position_embedding": build_position_embedding,
    "multihead_attention": build_multihead_attention,
    "token_mean": build_token_mean,
}

#: kind -> whether the training steps of a model made only of such layers go through XLA (jit_compile):
#: XLA's CPU code beats TensorFlow's own kernels for dense layers, flatten and batchnorm, and falls behind
#: them for convolutions, pooling and dropout (its random masks). Any kind marked False keeps a model off XLA.
XLA: dict[str, bool] = {
    "dense": True,
    "conv2d": False,
    "maxpool2d": False,
    "flatten": True,
    "batchnorm": True,
    "dropout": False,
    "add": True,
    "avgpool2d": False,
    "global_avgpool2d": True,
    "layernorm": True,
    "tokens": True,
    "position_embedding": True,
    "multihead_attention": True,
    "token_mean": True,
}


def build_model(model: ResolvedModel) -> keras.Model:
    """The spec as a Keras functional model on N, H, W, C inputs, each layer over the outputs of the layers it
    takes; layers keep the spec's names."""
    c, h, w = model.input_shape
    inputs = keras.Input(shape=(h, w, c))
    outputs = {INPUT: inputs}
    for r in model.layers:
        taken = [outputs[source] for source in r.sources]
        outputs[r.name] = BUILDERS[r.kind](r, taken[0] if len(taken) == 1 else taken)
    return keras.Model(inputs, outputs[model.layers[-1].name], name="model")


#: Batches run per call of the compiled training function (fewer where progress is due sooner): one
#: Python call, and one read of the running loss, per chunk instead of per batch.
CHUNK_STEPS = 64


#: kinds whose models go through XLA whatever else they hold: TensorFlow's own kernels run attention as many
#: small operations, which XLA fuses (a transformer's patch convolution is one matrix product, which XLA does well)
XLA_FIRST = frozenset({"multihead_attention"})


def compiles_well(model: ResolvedModel) -> bool:
    """Whether the training steps go through XLA: where the model has a kind of XLA_FIRST, or every layer's kind is
    marked so in XLA."""
    return any(r.kind in XLA_FIRST for r in model.layers) or all(XLA[r.kind] for r in model.layers)


class _TrainingSteps:
    """SGD steps on cross-entropy as one compiled TensorFlow function that runs a chunk of batches:
    what `model.fit` does per batch (forward pass, loss, gradients, the optimizer's update, the running
    loss and accuracy) without fit's machinery around it (data adapter, iterators, callbacks, metric
    objects). The same updates, batch by batch, as fit's: tests/integration/test_adapters.py holds it to
    fit's weights, loss and accuracy."""

    def __init__(self, model: keras.Model, momentum: float, jit: bool):
        self.optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=momentum)
        variables = model.trainable_variables
        self.optimizer.build(variables)
        loss_of = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # the batch's mean
        optimizer = self.optimizer

        @tf.function(jit_compile=jit)
        def run(inputs: tf.Tensor, labels: tf.Tensor, index: tf.Tensor, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            """Steps `index[0]` .. `index[steps - 1]` (rows of sample indices, one batch each); the loss summed
            over their samples, and how many they predicted right (before each step's update)."""
            loss_sum, hits = tf.zeros((), tf.float32), tf.zeros((), tf.int32)
            size = tf.cast(tf.shape(index)[1], tf.float32)
            for step in tf.range(steps):
                x, y = tf.gather(inputs, index[step]), tf.gather(labels, index[step])
                with tf.GradientTape() as tape:
                    logits = model(x, training=True)
                    loss = loss_of(y, logits)
                optimizer.apply(tape.gradient(loss, variables), variables)
                loss_sum += loss * size
                hits += tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.int32))
            return loss_sum, hits

        self.run = run

    def reset(self, learning_rate: float) -> None:
        """A fresh optimizer at `learning_rate`: no momentum, step count 0 (the compiled function stays)."""
        self.optimizer.learning_rate = learning_rate
        self.optimizer.iterations.assign(0)
        for slot in self.optimizer.momentums:
            slot.assign(tf.zeros(slot.shape, slot.dtype))


def _chunks(steps: list[Step], due: Callable[[int], bool]) -> Iterator[list[Step]]:
    """The epoch's steps in runs for one call each: at most CHUNK_STEPS, all of one batch size, each ending
    where progress is due (`due(batch)`, the tracker's rule) so that it is reported at the batch it names."""
    chunk: list[Step] = []
    for step in steps:
        if chunk and len(step.indices) != len(chunk[0].indices):
            yield chunk
            chunk = []
        chunk.append(step)
        if len(chunk) == CHUNK_STEPS or due(step.batch):
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _InputTensor:
    """The last array given, in N, H, W, C as a TensorFlow tensor, made again only when another array comes.

    The worker hands over its data set (a new view of the same memory each call); Keras would copy numpy
    inputs into fresh tensors on every fit and predict, a copy of the whole data set each time.
    """

    def __init__(self) -> None:
        self._array: np.ndarray | None = None  # kept alive, so its memory cannot be another array's
        self._tensor: tf.Tensor | None = None

    def __call__(self, x: np.ndarray) -> tf.Tensor:
        if self._array is None or not (self._array is x or same_view(self._array, x)):
            self._array, self._tensor = None, None  # let the previous one go first
            self._tensor = tf.constant(to_nhwc(x))
            self._array = x
        return self._tensor


class KerasAdapter(FrameworkAdapter):
    framework = "keras"

    def __init__(self, device: str = "auto") -> None:
        configure_devices(device)
        self.model: keras.Model | None = None
        self.resolved: ResolvedModel | None = None
        self._steps: _TrainingSteps | None = None  # the last Train's compiled steps and optimizer
        self._train_inputs = _InputTensor()
        self._predict_inputs = _InputTensor()
        self._forward: tf.types.experimental.PolymorphicFunction | None = None  # the model's inference pass, traced once

    def build(self, model: ResolvedModel, seed: int) -> None:
        keras.utils.set_random_seed(seed32(seed))
        built = build_model(model)
        self.model, self.resolved, self._steps, self._forward = built, model, None, None

    def _layers_with_tensors(self) -> list[str]:
        return [r.name for r in self.resolved.layers if r.params]

    def _variables(self) -> dict[str, list[tf.Variable]]:
        """{layer name: its weight variables as TensorFlow holds them} for the layers with tensors, each
        layer's in its `weights` order (what keras_to_canonical / canonical_to_keras list per layer).

        They are read and assigned with TensorFlow's own variable ops (ReadVariableOp, AssignVariableOp), without
        the conversions, checks and autocasting Keras' layer.get_weights / set_weights add per variable; a move
        into a Keras worker reads, sets and reads again (service._apply)."""
        return {name: [variable.value for variable in self.model.get_layer(name).weights] for name in self._layers_with_tensors()}

    def versions(self) -> tuple[str, str]:
        return keras.__version__, f"tensorflow {tf.__version__}"

    def device(self) -> str:
        # e.g. "/job:localhost/replica:0/task:0/device:GPU:0" -> "gpu:0"
        placed = self.model.weights[0].value.device
        return placed.rsplit("device:", 1)[-1].lower() if placed else "cpu:0"

    def _host_layers(self) -> dict[str, list[np.ndarray]]:
        """{layer name: its variables' values}, as views of their memory where TensorFlow lends it (host_view):
        valid while nothing assigns them, so only for converting at once."""
        return {name: [host_view(tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype)) for v in variables]
                for name, variables in self._variables().items()}

    def get_weights(self) -> WeightSet:
        return keras_to_canonical(self._host_layers(), self.resolved)

    def read_weights(self, out: WeightSet) -> None:
        """Converted from the variables' own memory straight into `out`: no copy of the set between."""
        keras_into_canonical(self._host_layers(), self.resolved, out)

    def weight_views(self) -> WeightSet | None:
        """The canonical tensors as views of the variables' memory (a dense kernel [in, out] seen as [out, in]:
        strided, sent band by band), other kinds' small tensors converted; only where the variables are in
        host memory (else None: the worker sends from a snapshot)."""
        if any("GPU" in v.device.upper() for layer in self._variables().values() for v in layer):
            return None
        return keras_canonical_views(self._host_layers(), self.resolved)

    def _transposed_kernels(self, variables: dict[str, list[tf.Variable]]) -> set[str]:
        """The layers whose kernel is a large dense weight's plain transpose (layouts.reordered_rows) held in host memory:
        received straight into the kernel's layout (conversion), or transposed by TensorFlow (transposed_tensor).
        Both sides over 1: TensorFlow's transpose of a [1, n] or [n, 1] matrix shares its input's memory."""
        return {name.rsplit(".", 1)[0] for name in transposed_kernels(self.resolved, TILED_TRANSPOSE_BYTES)
                if "GPU" not in variables[name.rsplit(".", 1)[0]][0].device.upper()}

    def conversion(self, manifest: Mapping[str, TensorSpec]) -> BandConversion | None:
        """Large plain dense kernels in host memory received band by band straight into fresh aligned memory the
        variables then take (set_weights' `converted`)."""
        if self.model is None:
            return None
        targets = {f"{name}.weight" for name in self._transposed_kernels(self._variables())} & set(manifest)
        return BandConversion(targets) if targets else None

    def _keras_values(self, weights: Mapping[str, np.ndarray], variables: dict[str, list[tf.Variable]],
                      converted: Mapping[str, np.ndarray]) -> dict[str, list]:
        """{layer name: its variables' new values}: a large plain dense kernel as the receive converted it
        (`converted`), else transposed by TensorFlow into its own memory (transposed_tensor); every other layer by
        the layout (fresh aligned arrays, weightrelay.layouts)."""
        values = {}
        transposed = self._transposed_kernels(variables)
        for r in self.resolved.layers:
            if not r.params:
                continue
            tensors = r.tensors(weights)
            if r.name in transposed:
                kernel = converted.get(f"{r.name}.weight")
                kernel = kernel if kernel is not None and kernel.shape == tensors["weight"].shape[::-1] else transposed_tensor(tensors["weight"])
                values[r.name] = [kernel, fresh_copy(tensors["bias"])]
            else:
                values[r.name] = canonical_to_keras(weights, self.resolved, only=r.name)[r.name]
        return values

    def set_weights(self, weights: Mapping[str, np.ndarray], converted: Mapping[str, np.ndarray] | None = None) -> None:
        """Converted (_keras_values; `converted`: kernels the receive's conversion already made) and checked, every
        variable, before any is assigned; each new value becomes the variable's memory (a tensor TensorFlow made,
        or owned_tensor): no copy beyond the conversion."""
        variables = self._variables()
        values = self._keras_values(weights, variables, converted or {})
        pairs = [pair for name, layer in variables.items() for pair in zip(layer, values[name], strict=True)]
        for variable, value in pairs:  # all checked before any is assigned
            if tuple(value.shape) != tuple(variable.shape) or tf.as_dtype(value.dtype) != variable.dtype:
                raise ValueError(f"variable {variable.name}: expected {variable.dtype.name} {list(variable.shape)}, "
                                 f"got {tf.as_dtype(value.dtype).name} {list(value.shape)}")
        del values  # each value is the variable's memory once assigned: the old one goes as soon as it is replaced
        while pairs:
            variable, value = pairs.pop(0)
            if isinstance(value, np.ndarray):
                value = owned_tensor(value, variable.device)
            tf.raw_ops.AssignVariableOp(resource=variable.handle, value=value)
            del value

    def _touch_variables(self) -> None:
        """Read every weight variable and assign it what was read (its own value, nothing changes).

        After training (fit, or the compiled steps here) the first read and the first assignment of each
        variable are slower than later ones, as if TensorFlow had dropped what it cached for them (the cause
        is TensorFlow's). Touched here, that is paid inside Train instead of in the first move into the worker."""
        for variable in (v for layer in self._variables().values() for v in layer):
            tf.raw_ops.AssignVariableOp(resource=variable.handle, value=tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=variable.dtype))

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        keras.utils.set_random_seed(seed32(config.seed + config.start_step))  # dropout
        training = self._training_steps(config)
        inputs, labels = self._train_inputs(x), tf.constant(y.astype(np.int32, copy=False))
        for epoch in schedule(config, len(x)):  # the core's batches, in its order
            tracker.start_epoch()
            loss_sum, hits = 0.0, 0
            for chunk in _chunks(epoch, tracker.due):
                index = np.zeros((CHUNK_STEPS, len(chunk[0].indices)), np.int32)  # one shape per batch size: one trace
                index[: len(chunk)] = [step.indices for step in chunk]
                chunk_loss, chunk_hits = training.run(inputs, labels, tf.constant(index), tf.constant(len(chunk), tf.int32))
                loss_sum, hits = loss_sum + float(chunk_loss), hits + int(chunk_hits)
                if tracker.batches_done(chunk[0].batch, chunk[-1].batch):
                    seen = tracker.epoch_samples
                    tracker.batch_done(chunk[-1].epoch, chunk[-1].batch, loss_sum / seen, hits / seen)
        self._touch_variables()

    def _training_steps(self, config: TrainConfig) -> _TrainingSteps:
        """The compiled steps with SGD at the config's rate: the previous Train's optimizer as it was
        (keep_optimizer), or a fresh one. A fresh one for the same momentum is the last one zeroed, so that
        the compiled function is reused instead of traced and compiled again, every round of a relay."""
        if self._steps is not None and config.keep_optimizer:
            return self._steps
        if self._steps is None or self._steps.optimizer.momentum != config.momentum:
            self._steps = _TrainingSteps(self.model, config.momentum, jit=compiles_well(self.resolved))
        self._steps.reset(config.learning_rate)
        return self._steps

    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """The model's inference pass over `x` in batches, as predict() computes it without predict()'s own
        machinery (data adapter, iterator, callbacks), traced once."""
        if self._forward is None:
            model = self.model
            batch = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
            self._forward = tf.function(lambda inputs: model(inputs, training=False), input_signature=[batch])
        inputs = self._predict_inputs(x)
        logits = [self._forward(inputs[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
        return np.concatenate(logits).astype(np.float32, copy=False) if logits else np.zeros((0,) + tuple(self.model.output_shape[1:]), np.float32)
