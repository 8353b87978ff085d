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
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import numpy as np

from weightrelay import defaults
from weightrelay.codec import TensorSpec, WeightSet
from weightrelay.conversion import BandConversion
from weightrelay.models import ResolvedModel

T = TypeVar("T")


class TrainingCancelled(Exception):
    """Raised from a progress callback when the client has gone away."""


class NonFiniteLoss(Exception):
    """Raised from a progress report whose mean loss is NaN or infinite: training has diverged."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    learning_rate: float = defaults.LEARNING_RATE
    momentum: float = defaults.MOMENTUM
    seed: int = 0
    progress_every_batches: int = 0
    start_step: int = 0          # run steps [start_step, start_step + max_steps) of the schedule
    max_steps: int = 0           # 0: to the end
    keep_optimizer: bool = False  # continue the previous Train's optimizer state (momentum)


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


@dataclass(frozen=True)
class Step:
    epoch: int            # 1-based
    batch: int            # 1-based within the epoch
    indices: np.ndarray   # the samples of this batch


def steps_per_epoch(config: TrainConfig, samples: int) -> int:
    """Batches in one epoch over `samples`: the last one smaller, and one batch of every sample when
    the batch size is larger than the samples."""
    return max(1, -(-samples // config.batch_size))


def schedule_steps(config: TrainConfig, samples: int) -> int:
    """How many steps the whole schedule has (`start_step` must be below it)."""
    return config.epochs * steps_per_epoch(config, samples)


def schedule(config: TrainConfig, samples: int) -> list[list[Step]]:
    """The steps a Train runs, grouped by epoch: every framework trains exactly these batches, in this order.

    The whole schedule is `epochs` epochs over the samples in `batch_order`, in batches of
    `batch_size` (the last of an epoch smaller); a Train runs `max_steps` of it from `start_step`.
    """
    per_epoch = steps_per_epoch(config, samples)
    total = schedule_steps(config, samples)
    first = min(config.start_step, total)
    last = total if not config.max_steps else min(total, first + config.max_steps)
    groups: list[list[Step]] = []
    for epoch in range((first // per_epoch) + 1, -(-last // per_epoch) + 1):
        order = batch_order(config.seed, epoch, samples)
        steps = []
        for batch in range(1, per_epoch + 1):
            index = (epoch - 1) * per_epoch + batch - 1
            if first <= index < last:
                start = (batch - 1) * config.batch_size
                steps.append(Step(epoch, batch, order[start : start + config.batch_size]))
        if steps:
            groups.append(steps)
    return groups


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
        self.batches = steps_per_epoch(config, samples)
        self.on_progress = on_progress
        self.samples_seen = 0
        self.last: TrainProgress | None = None
        self.steps_left = sum(len(group) for group in schedule(config, samples))
        self._epoch_start = time.perf_counter()
        self._epoch_samples = 0
        self._report = False

    def start_epoch(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_samples = 0

    def wants(self, batch: int) -> bool:
        """Whether batch `batch` (1-based) is reported; adapters skip device syncs for the others.

        Adapters call this once after every batch, so it also counts the steps and is where a
        cancelled Train stops: it raises TrainingCancelled once the client has gone away.
        """
        if self.cancelled is not None and self.cancelled.is_set():
            raise TrainingCancelled()
        size = min(self.config.batch_size, self.samples - (batch - 1) * self.config.batch_size)
        self.samples_seen += size
        self._epoch_samples += size
        self.steps_left -= 1
        self._report = self.due(batch) or self.steps_left <= 0
        return self._report

    def due(self, batch: int) -> bool:
        """Whether progress is due after batch `batch` (1-based) of an epoch: every `progress_every_batches`
        and at the epoch's end (and, wants adds, at the Train's last step). Counts nothing."""
        every = self.config.progress_every_batches
        return batch >= self.batches or bool(every and batch % every == 0)

    def batches_done(self, first: int, last: int) -> bool:
        """Count batches first..last (1-based) that a framework ran in one call (the Keras adapter's compiled steps);
        whether batch `last` is reported, with the running means after it."""
        report = False
        for batch in range(first, last + 1):
            report = self.wants(batch) or report
        self._report = report
        return report

    @property
    def epoch_samples(self) -> int:
        """Samples trained so far in this epoch by this Train: the divisor of the running means."""
        return self._epoch_samples

    def batch_done(self, epoch: int, batch: int, mean_loss: float, accuracy: float) -> None:
        """Report batch `batch` (1-based) of `epoch` (1-based) with the epoch's running means (call after wants)."""
        if not self._report:
            return
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"the mean loss is {mean_loss} at epoch {epoch}, batch {batch}")
        epoch_end = batch >= self.batches
        done = self._epoch_samples
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
        self.on_progress(self.last)

    def result(self) -> TrainResult:
        last = self.last
        return TrainResult(
            epochs=self.config.epochs,
            samples_seen=self.samples_seen,
            loss=last.loss if last else float("nan"),
            accuracy=last.accuracy if last else float("nan"),
        )


class ModelThread:
    """An adapter whose model operations all run on one long-lived thread of their own.

    The gRPC server calls from a pool of threads; frameworks keep per-thread state (each calling
    thread gets its own OpenMP team in PyTorch, and libgomp throttles its spinning once it manages
    more threads than there are cores), so a model touched from several threads trains slower than
    the same loop in a plain process. Here every operation that
    touches the model (build, train, predict, get/set weights) goes to the one model thread; the
    rest (names, versions, the device) is read directly, so Describe still answers during training.
    """

    OPERATIONS = frozenset({"build", "get_weights", "read_weights", "set_weights", "adopt_weights", "weight_views", "train", "predict_logits"})

    def __init__(self, adapter: "FrameworkAdapter"):
        self._adapter = adapter
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon thread: a worker that is told to stop never waits for it at exit.
        self._thread = threading.Thread(target=self._serve, name="model", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            self._perform(*self._tasks.get())  # the task's arguments go with the call: they may hold a set's memory

    @staticmethod
    def _perform(function: Callable, args: tuple, kwargs: dict, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    def run(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on the model thread: several model operations for one hand-over (each costs
        a thread wake-up, a noticeable part of moving a small set). Operations it calls run directly."""
        if threading.current_thread() is self._thread:
            return function(*args)
        future: Future = Future()
        self._tasks.put((function, args, {}, future))
        return future.result()

    def __getattr__(self, name: str):
        attribute = getattr(self._adapter, name)
        if name not in self.OPERATIONS:
            return attribute

        def on_model_thread(*args, **kwargs):
            if self._adapter.thread_free(name, *args):  # the caller holds the model: the model thread is idle
                return attribute(*args, **kwargs)
            return self.run(lambda: attribute(*args, **kwargs))

        return on_model_thread


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

    def read_weights(self, out: WeightSet) -> None:
        """Copy the manifest's tensors into `out`'s arrays (each of its tensor's shape and dtype).

        The worker reuses those arrays from move to move (weightrelay.buffers: fresh memory is slow
        to touch); this default copies `get_weights()`, adapters override it to copy once.
        """
        for name, array in self.get_weights().items():
            np.copyto(out[name], array)

    @abc.abstractmethod
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all of the manifest's tensors; `weights` is already checked against it.

        Copy the values: the arrays' memory is reused for the next weight set once this returns.
        An adapter whose `conversion` gives one also takes `converted=` {canonical name: the tensor already
        in its own layout, fresh memory it may keep}: those tensors need no conversion.
        """

    def conversion(self, manifest: Mapping[str, TensorSpec]) -> BandConversion | None:
        """The tensors of `manifest` to receive straight into this framework's layout while a set arrives
        (weightrelay.conversion: the worker keeps no canonical copy of them), or None (this default): the
        set is received whole and converted in set_weights."""
        return None

    def thread_free(self, operation: str, *args) -> bool:
        """Whether `operation(*args)` starts none of the framework's threads (plain memory copies, pointer
        swaps), so the worker may run it on the calling thread instead of handing it to the model thread
        (ModelThread): a hand-over wakes two threads, several times in a small move. The
        worker calls model operations only while it holds the model, so nothing else runs on it then.
        This default: none."""
        return False

    def weight_views(self) -> WeightSet | None:
        """The manifest's tensors as arrays that share the model's memory (canonical layout, little-endian),
        or None (this default) where the framework has no such view. The worker streams large sets from
        them while it holds the model (store.DirectRead), instead of from a snapshot."""
        return None

    def adopt_weights(self, weights: WeightSet) -> bool:
        """Make `weights`' arrays the model's own storage instead of copying them, and return True; or
        change nothing and return False (this default), where the framework cannot (another device,
        dtype or layout); the service then calls set_weights. All or nothing either way.

        The service passes sets it received into memory it then keeps for the model (weightrelay.buffers);
        taking them saves the copy, and for small sets the backup and read-back that make a copy all or
        nothing."""
        return False

    @abc.abstractmethod
    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        """Train with SGD on cross-entropy over exactly the steps of `schedule(config, n)` (grouped by epoch;
        call tracker.start_epoch() before each group and tracker.wants(batch) after each step), with a fresh
        optimizer unless config.keep_optimizer; randomness of the step itself (dropout) seeded from config.seed."""

    @abc.abstractmethod
    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Logits float32 [n, classes] for inputs float32 [n, C, H, W], in inference mode."""
