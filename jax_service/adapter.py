"""Model specs in JAX: Flax (linen) layers on N, H, W, C inputs, optax SGD with momentum.
Layouts are converted at this boundary (jax_service.layout)."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share a GPU politely, like the others

from typing import Any, Callable, Mapping  # noqa: E402

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jax_service.layout import canonical_to_flax, flax_canonical_views, flax_into_canonical, flax_to_canonical  # noqa: E402
from weightrelay.adapter import FrameworkAdapter, ProgressTracker, TrainConfig, schedule, seed32  # noqa: E402
from weightrelay.buffers import recycled_memory  # noqa: E402
from weightrelay.codec import TensorSpec, WeightSet  # noqa: E402
from weightrelay.conversion import BandConversion  # noqa: E402
from weightrelay.layouts import to_nhwc, transposed_kernels  # noqa: E402
from weightrelay.transpose import TILED_TRANSPOSE_BYTES  # noqa: E402
from weightrelay.models import INPUT, ResolvedLayer, ResolvedModel  # noqa: E402

ACTIVATIONS = {"none": lambda x: x, "relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid,
               "gelu": lambda x: nn.gelu(x, approximate=False),  # Flax's default is the tanh form
               "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


class PositionEmbedding(nn.Module):
    """A learned table `embedding` [tokens, features] added to every sample's tokens (flax.linen has no such layer)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x + self.param("embedding", nn.initializers.normal(stddev=0.02), x.shape[1:])


# -- one builder per kind: called inside SpecModule's compact __call__, it applies the layer to x (N, H, W, C;
# a kind of several inputs, add, gets the tuple of them), its submodule named after the spec's layer where it
# has tensors ----------------------------------------------------------------------------------------------
def build_dense(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    return nn.Dense(r.output_shape[-1], name=r.name)(x)


def build_conv2d(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    layer = r.layer
    top, bottom, left, right = r.padding
    conv = nn.Conv(layer.filters, (layer.kernel, layer.kernel), strides=(layer.stride, layer.stride),
                   padding=((top, bottom), (left, right)), name=r.name)
    return conv(x)


def build_maxpool2d(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    size, step = r.layer.size, r.layer.step
    return nn.max_pool(x, (size, size), strides=(step, step), padding="VALID")


def build_flatten(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    return x.reshape((x.shape[0], -1))  # H, W, C order: the layout permutes the next kernel


def build_batchnorm(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    norm = nn.BatchNorm(use_running_average=not train, momentum=1.0 - r.layer.momentum, epsilon=r.layer.eps, name=r.name)
    return norm(x)


def build_dropout(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    return nn.Dropout(r.layer.rate, deterministic=not train)(x)


def build_add(r: ResolvedLayer, xs: tuple[jnp.ndarray, ...], train: bool) -> jnp.ndarray:
    return sum(xs[1:], xs[0])


def build_avgpool2d(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    size, step = r.layer.size, r.layer.step
    return nn.avg_pool(x, (size, size), strides=(step, step), padding="VALID")


def build_global_avgpool2d(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    return jnp.mean(x, axis=(1, 2))  # flax.linen has no layer for it


def build_layernorm(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    # the two-pass variance (E[(x - mean)^2]), as the reference and the other frameworks compute it
    return nn.LayerNorm(epsilon=r.layer.eps, use_fast_variance=False, name=r.name)(x)


def build_tokens(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    return x.reshape((x.shape[0], -1, x.shape[-1]))  # N, H, W, C -> N, H*W, C: row-major over H, W


def build_position_embedding(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    return PositionEmbedding(name=r.name)(x)


def build_multihead_attention(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    features = r.input_shape[-1]
    attention = nn.MultiHeadDotProductAttention(num_heads=r.layer.heads, qkv_features=features, out_features=features,
                                                dropout_rate=0.0, deterministic=True, name=r.name)
    return attention(x)  # self-attention: keys and values are the query's tokens


def build_token_mean(r: ResolvedLayer, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    return jnp.mean(x, axis=1)


#: kind -> its builder (every kind of weightrelay.layers.KINDS; tests/unit/test_models.py checks)
BUILDERS: dict[str, Callable[[ResolvedLayer, jnp.ndarray, bool], jnp.ndarray]] = {
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


class SpecModule(nn.Module):
    """The spec's layers in order, each over the outputs of the layers it takes and followed by its activation;
    parameters keep the spec's layer names."""

    model: ResolvedModel

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        outputs = {INPUT: x}
        for r in self.model.layers:
            taken = tuple(outputs[source] for source in r.sources)
            x = outputs[r.name] = ACTIVATIONS[r.layer.activation](BUILDERS[r.kind](r, taken[0] if len(taken) == 1 else taken, train))
        return x


def host_view(array: jax.Array) -> np.ndarray:
    """An array's values as numpy: a read-only view of its memory where JAX lends it (the CPU, through DLPack),
    else a copy (jax.device_get: a GPU's array)."""
    try:
        return np.from_dlpack(array)
    except Exception:  # noqa: BLE001 - memory DLPack cannot lend to numpy (another device)
        return np.asarray(jax.device_get(array))


def _free_replaced_arrays() -> None:
    """Free the arrays the model no longer holds now. Arrays that took numpy memory (device_put on the CPU)
    are only freed by Python's cycle collector, which may not run for a long time: without this, a worker
    holds one more weight set after every set it received, until it happens to run. The collection walks
    only what was made since the adapter started (see _exempt_startup_objects)."""
    gc.collect()


def _exempt_startup_objects() -> None:
    """Leave the objects that exist before any model is built (JAX's, Flax's and the worker's modules, about
    130,000) out of every later cycle collection: they live as long as the process, and walking them made
    each collection after a received set take 45-65 ms, in the move's time (gc.freeze)."""
    gc.freeze()


def resolve_device(requested: str) -> jax.Device:
    if requested == "cpu":
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if requested == "cuda" and not gpus:
        raise ValueError("--device cuda was asked for, but JAX sees no GPU; use --device cpu or auto")
    return gpus[0] if gpus else jax.devices("cpu")[0]


class JaxAdapter(FrameworkAdapter):
    framework = "jax"

    def __init__(self, device: str = "auto") -> None:
        self._device = resolve_device(device)
        self.resolved: ResolvedModel | None = None
        self.module: SpecModule | None = None
        self.params: Any = None
        self.stats: Any = None
        self.opt_state: Any = None
        self._in_numpy_memory = False  # whether the arrays are a received set's memory (see _free_replaced_arrays)
        _exempt_startup_objects()

    def build(self, model: ResolvedModel, seed: int) -> None:
        module = SpecModule(model)
        c, h, w = model.input_shape
        with jax.default_device(self._device):
            variables = module.init(jax.random.PRNGKey(seed32(seed)), jnp.zeros((1, h, w, c), jnp.float32), train=False)
        # Placed on the device explicitly, as set_weights places a received set: JAX compiles a function again
        # for arrays committed to a device where it had seen uncommitted ones, so otherwise the first Train
        # after the first SetWeights would compile its step a second time.
        params, stats = jax.device_put((variables["params"], variables.get("batch_stats", {})), self._device)

        def loss_and_stats(params, stats, x, y, key):
            logits, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                           rngs={"dropout": key}, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, updates.get("batch_stats", {}))

        # optax.sgd: trace = g + momentum * trace, w -= lr * trace (PyTorch's formulation); the learning rate
        # and momentum live in the optimizer state, so one compiled step serves every Train.
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.01, momentum=0.0)

        def step(params, stats, opt_state, totals, x, y, key, index):
            """One update; the epoch's running loss sum and hits stay on the device (no per-batch dispatch)."""
            (loss, (logits, stats)), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(params, stats, x, y, jax.random.fold_in(key, index))
            updates, opt_state = tx.update(grads, opt_state, params)
            loss_sum, hits = totals
            totals = (loss_sum + loss * y.shape[0], hits + (logits.argmax(-1) == y).sum())
            return optax.apply_updates(params, updates), stats, opt_state, totals

        self._tx = tx
        self._step = jax.jit(step)
        self._predict = jax.jit(lambda params, stats, x: module.apply({"params": params, "batch_stats": stats}, x, train=False))
        self.module, self.resolved, self.params, self.stats, self.opt_state = module, model, params, stats, None
        self._in_numpy_memory = False

    def versions(self) -> tuple[str, str]:
        return jax.__version__, f"flax {flax.__version__}, optax {optax.__version__}"

    def device(self) -> str:
        return f"{self._device.platform}:{self._device.id}"

    def get_weights(self) -> WeightSet:
        return flax_to_canonical(*self._host_trees(), self.resolved)

    def _host_trees(self) -> tuple[Any, Any]:
        """(params, batch_stats) as numpy: views of the arrays' memory on the CPU (host_view), valid while they live."""
        return jax.tree_util.tree_map(host_view, self.params), jax.tree_util.tree_map(host_view, self.stats)

    def read_weights(self, out: WeightSet) -> None:
        """Converted from the arrays' own memory (on the CPU: no copy between) straight into `out`."""
        flax_into_canonical(*self._host_trees(), self.resolved, out)

    def weight_views(self) -> WeightSet | None:
        """The canonical tensors as views of the arrays' memory (a dense kernel [in, out] seen as [out, in]:
        strided, sent band by band), other kinds' small tensors converted; only on the CPU (else None: the
        worker sends from a snapshot)."""
        if self._device.platform != "cpu":
            return None
        return flax_canonical_views(*self._host_trees(), self.resolved)

    def conversion(self, manifest: Mapping[str, TensorSpec]) -> BandConversion | None:
        """On the CPU, large plain dense kernels received band by band straight into aligned memory the arrays
        then take (set_weights' `converted`)."""
        if self._device.platform != "cpu" or self.resolved is None:
            return None
        targets = transposed_kernels(self.resolved, TILED_TRANSPOSE_BYTES) & set(manifest)
        return BandConversion(targets) if targets else None

    def set_weights(self, weights: Mapping[str, np.ndarray], converted: Mapping[str, np.ndarray] | None = None) -> None:
        """The converted arrays are fresh and aligned (weightrelay.layouts; `converted`: kernels the receive's
        conversion already made), nothing else holds them: on the CPU device_put takes them as the arrays'
        memory without a copy (none of the worker's reused memory)."""
        params, stats = canonical_to_flax(weights, self.resolved, converted)
        self.params, self.stats = jax.device_put((params, stats), self._device)
        self._in_numpy_memory = True
        _free_replaced_arrays()

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        params, stats = self.params, self.stats
        opt_state = self.opt_state
        if opt_state is None or not config.keep_optimizer:
            opt_state = self._tx.init(params)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(config.learning_rate, jnp.float32)
        opt_state.hyperparams["momentum"] = jnp.asarray(config.momentum, jnp.float32)
        inputs, labels = to_nhwc(x), y.astype(np.int32)
        key = jax.random.PRNGKey(seed32(config.seed))  # dropout
        step_index = config.start_step
        try:
            for steps in schedule(config, len(inputs)):
                tracker.start_epoch()
                totals = (jnp.zeros(()), jnp.zeros((), jnp.int32))
                for step in steps:
                    xb, yb = inputs[step.indices], labels[step.indices]  # the jitted step's own dispatch moves them to the device
                    params, stats, opt_state, totals = self._step(params, stats, opt_state, totals, xb, yb, key, step_index)
                    step_index += 1
                    if tracker.wants(step.batch):
                        seen = tracker.epoch_samples
                        tracker.batch_done(step.epoch, step.batch, float(totals[0]) / seen, int(totals[1]) / seen)
        finally:
            self.params, self.stats, self.opt_state = params, stats, opt_state  # what training reached, also when stopped early
            del params, stats, opt_state
            if self._in_numpy_memory:  # the set's arrays, replaced by training's own
                self._in_numpy_memory = False
                _free_replaced_arrays()
                recycled_memory.release()  # their memory too: an idle worker holds its model, not a set more

    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        inputs = to_nhwc(x)
        outputs = [np.asarray(self._predict(self.params, self.stats, jax.device_put(inputs[start : start + batch_size], self._device)))
                   for start in range(0, len(inputs), batch_size)]
        return np.concatenate(outputs).astype(np.float32)
