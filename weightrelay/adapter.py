"""The interface one framework implements to become a weightrelay worker.

An adapter builds a resolved model spec (`weightrelay.models`), trains it on in-memory
arrays (N, C, H, W) in the batch order the core gives it, produces logits, and reads and
writes its parameters in the canonical layout (see worker.proto). Everything else (gRPC,
the codec, validation, scoring, data, seeds) is shared, so a new framework is one new
package with one adapter class and a three-line `__main__`.
"""

from __future__ import annotations

import abc
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from weightrelay.codec import WeightSet
from weightrelay.models import ResolvedModel


class TrainingCancelled(Exception):
    """Raised from a progress callback when the client has gone away."""


class NonFiniteLoss(Exception):
    """Raised from a progress report whose mean loss is NaN or infinite: training has diverged."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.5
    seed: int = 0
    progress_every_batches: int = 0


@dataclass(frozen=True)
class TrainProgress:
    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    accuracy: float
    samples_per_second: float
    epoch_end: bool


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    samples_seen: int
    loss: float
    accuracy: float


ProgressCallback = Callable[[TrainProgress], None]


def batch_order(seed: int, epoch: int, samples: int) -> np.ndarray:
    """The order in which epoch `epoch` (1-based) visits the samples: the same in every framework."""
    return np.random.default_rng([seed, epoch]).permutation(samples)


def seed32(seed: int) -> int:
    """A uint64 seed for frameworks that take 32 bits: itself when it fits, else derived from it."""
    if 0 <= seed < 2**32:
        return seed
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


class ProgressTracker:
    """Turns an adapter's per-batch running means into progress events at the requested pace."""

    def __init__(self, config: TrainConfig, samples: int, on_progress: ProgressCallback, cancelled: threading.Event | None = None):
        self.config = config
        self.cancelled = cancelled
        self.samples = samples
        self.batches = max(1, -(-samples // config.batch_size))
        self.on_progress = on_progress
        self.samples_seen = 0
        self.last: TrainProgress | None = None
        self._epoch_start = time.perf_counter()

    def start_epoch(self) -> None:
        self._epoch_start = time.perf_counter()

    def wants(self, batch: int) -> bool:
        """Whether batch `batch` (1-based) is reported; adapters skip device syncs for the others.

        Adapters call this after every batch, so it is also where a cancelled Train stops:
        it raises TrainingCancelled once the client has gone away.
        """
        if self.cancelled is not None and self.cancelled.is_set():
            raise TrainingCancelled()
        every = self.config.progress_every_batches
        return batch >= self.batches or bool(every and batch % every == 0)

    def batch_done(self, epoch: int, batch: int, mean_loss: float, accuracy: float) -> None:
        """Report batch `batch` (1-based) of `epoch` (1-based) with the epoch's running means."""
        if not self.wants(batch):
            return
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"the mean loss is {mean_loss} at epoch {epoch}, batch {batch}")
        epoch_end = batch >= self.batches
        done = min(batch * self.config.batch_size, self.samples)
        elapsed = max(time.perf_counter() - self._epoch_start, 1e-9)
        self.last = TrainProgress(
            epoch=epoch,
            epochs=self.config.epochs,
            batch=batch,
            batches=self.batches,
            loss=float(mean_loss),
            accuracy=float(accuracy),
            samples_per_second=done / elapsed,
            epoch_end=epoch_end,
        )
        if epoch_end:
            self.samples_seen += self.samples
        self.on_progress(self.last)

    def result(self) -> TrainResult:
        last = self.last
        return TrainResult(
            epochs=self.config.epochs,
            samples_seen=self.samples_seen,
            loss=last.loss if last else float("nan"),
            accuracy=last.accuracy if last else float("nan"),
        )


class FrameworkAdapter(abc.ABC):
    """One framework's model behind the worker service. Not thread-safe: the service serialises calls."""

    #: short name reported by Describe, e.g. "torch"
    framework: str

    @abc.abstractmethod
    def __init__(self, device: str) -> None:
        """Choose the device ("auto", "cpu" or "cuda"); `build` makes the model."""

    @abc.abstractmethod
    def build(self, model: ResolvedModel, seed: int) -> None:
        """Replace the model with a fresh one of `model`, weights seeded by `seed` (any uint64).

        If building fails the previous model stays in place.
        """

    @abc.abstractmethod
    def versions(self) -> tuple[str, str]:
        """(framework version, backend description)."""

    @abc.abstractmethod
    def device(self) -> str:
        """The device the model really runs on, e.g. "cpu" or "cuda:0"."""

    @abc.abstractmethod
    def get_weights(self) -> WeightSet:
        """A copy of the manifest's tensors (parameters and buffers) in the canonical layout, float32."""

    @abc.abstractmethod
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all of the manifest's tensors; `weights` is already checked against it."""

    @abc.abstractmethod
    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        """Train with SGD on cross-entropy, epoch e visiting the samples in `batch_order(config.seed, e, n)`,
        reporting every batch to `tracker`; randomness of the step itself (dropout) seeded from config.seed."""

    @abc.abstractmethod
    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Logits float32 [n, classes] for inputs float32 [n, C, H, W], in inference mode."""
