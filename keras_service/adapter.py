"""The MLP in Keras 3 on the TensorFlow backend; kernels are transposed at this boundary."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Mapping  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_service.layout import canonical_to_keras, keras_to_canonical  # noqa: E402
from weightrelay.adapter import FrameworkAdapter, ProgressTracker, TrainConfig  # noqa: E402
from weightrelay.architecture import INPUT_FEATURES, LAYERS  # noqa: E402
from weightrelay.codec import WeightSet  # noqa: E402

LAYER_NAMES = tuple(layer.name for layer in LAYERS)


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


def build_model() -> keras.Model:
    layers = [keras.Input(shape=(INPUT_FEATURES,))]
    for layer in LAYERS:
        layers.append(keras.layers.Dense(layer.out_features, activation="relu" if layer.relu else None, name=layer.name))
    return keras.Sequential(layers, name="mlp")


class _ReportProgress(keras.callbacks.Callback):
    def __init__(self, tracker: ProgressTracker):
        super().__init__()
        self.tracker = tracker
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        self.tracker.start_epoch()

    def on_train_batch_end(self, batch, logs=None):
        if self.tracker.wants(batch + 1):  # Keras' logs are the epoch's running means
            self.tracker.batch_done(self.epoch, batch + 1, float(logs["loss"]), float(logs["accuracy"]))


class KerasAdapter(FrameworkAdapter):
    framework = "keras"

    def __init__(self, device: str = "auto", seed: int = 0) -> None:
        configure_devices(device)
        keras.utils.set_random_seed(seed)
        self.model = build_model()

    def versions(self) -> tuple[str, str]:
        return keras.__version__, f"tensorflow {tf.__version__}"

    def device(self) -> str:
        # e.g. "/job:localhost/replica:0/task:0/device:GPU:0" -> "gpu:0"
        placed = self.model.weights[0].value.device
        return placed.rsplit("device:", 1)[-1].lower() if placed else "cpu:0"

    def get_weights(self) -> WeightSet:
        return keras_to_canonical({name: self.model.get_layer(name).get_weights() for name in LAYER_NAMES})

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        for name, layer_weights in canonical_to_keras(weights, LAYER_NAMES).items():
            self.model.get_layer(name).set_weights(layer_weights)

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        keras.utils.set_random_seed(config.seed)
        self.model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        self.model.fit(
            x, y, batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=0,
            callbacks=[_ReportProgress(tracker)],
        )

    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return np.asarray(self.model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)
