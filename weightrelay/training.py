"""One Train on a thread of its own: the adapter trains, non-finite weights are never kept, and the
RPC thread receives progress and the outcome as events."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

import grpc

from weightrelay import codec, defaults
from weightrelay.adapter import ModelThread, NonFiniteLoss, ProgressTracker, TrainConfig, TrainProgress, TrainResult, schedule_steps
from weightrelay.data import Dataset
from weightrelay.errors import Refused
from weightrelay.objectives import Objective, parse_objective
from weightrelay.v1 import worker_pb2 as pb

_DONE = object()


def train_config(request: pb.TrainRequest, data: Dataset, current: Objective) -> tuple[TrainConfig, Objective]:
    """A Train request's settings (0 meaning the default) and objective (`current` when it names none) on
    `data`; every problem named at once (INVALID_ARGUMENT)."""
    train_samples = len(data.train.y)
    config = TrainConfig(
        epochs=request.epochs or defaults.EPOCHS,
        batch_size=request.batch_size or defaults.BATCH_SIZE,
        learning_rate=request.learning_rate or defaults.LEARNING_RATE,
        momentum=request.momentum,
        seed=request.seed,
        progress_every_batches=request.progress_every_batches,
        start_step=request.start_step,
        max_steps=request.max_steps,
        keep_optimizer=request.keep_optimizer,
    )
    problems = [problem for problem in (defaults.epochs_problem(request.epochs), defaults.learning_rate_problem(request.learning_rate),
                                        defaults.momentum_problem(request.momentum)) if problem]
    if request.batch_size > train_samples:
        problems.append(f"batch_size {request.batch_size} is larger than the {train_samples} training samples")
    samples = min(request.max_samples or train_samples, train_samples)
    total_steps = schedule_steps(config, samples)
    if request.start_step and request.start_step >= total_steps:
        problems.append(f"start_step {request.start_step} is past the schedule's {total_steps} steps")
    objective = current
    if request.objective:
        try:
            objective = parse_objective(request.objective, data.num_classes)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
    return config, objective


class TrainingDiverged(Exception):
    """Training left non-finite weights; the weights from before the Train were put back."""

    def __init__(self, what: str, config: TrainConfig):
        super().__init__(
            f"training diverged: {what} held NaN or Inf (learning_rate {config.learning_rate:g}, "
            f"momentum {config.momentum:g}); the weights from before this Train were restored; lower learning_rate or momentum"
        )


@dataclass(frozen=True)
class TrainingEnded:
    """How a Train ended: its result, or the exception that ended it (TrainingDiverged, TrainingCancelled,
    anything an adapter raised); the checksum of the weights the model holds now; its length."""

    outcome: TrainResult | BaseException
    weights_sha256: str
    seconds: float


class TrainingRun:
    """Runs `config` over (x, y) on the model and reports through `events()`: TrainProgress as it comes,
    then one TrainingEnded. `finished(ended)` is called on the training thread before that last event,
    once the model holds its final weights (the weights from before, where training diverged)."""

    def __init__(self, adapter: ModelThread, x: np.ndarray, y: np.ndarray, config: TrainConfig, cancelled: threading.Event,
                 finished: Callable[[TrainingEnded], None]):
        self.adapter, self.x, self.y, self.config, self.cancelled = adapter, x, y, config, cancelled
        self._finished = finished
        self._events: queue.Queue = queue.Queue()

    def start(self) -> None:
        start_weights = self.adapter.get_weights()  # put back if training diverges
        threading.Thread(target=self._run, args=(start_weights,), name="train", daemon=True).start()

    def events(self) -> Iterator[TrainProgress | TrainingEnded]:
        while (item := self._events.get()) is not _DONE:
            yield item

    def _run(self, start_weights: codec.WeightSet) -> None:
        started = time.perf_counter()
        ended = TrainingEnded(RuntimeError("training ended without an outcome"), "", 0.0)
        try:
            outcome, sha = self._kept_finite(self._train(), start_weights)
            ended = TrainingEnded(outcome, sha, time.perf_counter() - started)
        except Exception as exc:
            ended = TrainingEnded(exc, "", time.perf_counter() - started)
        finally:
            try:
                self._finished(ended)
            except Exception as exc:  # whatever happens, the call ends with an answer
                ended = TrainingEnded(exc, ended.weights_sha256, ended.seconds)
            self._events.put(ended)
            self._events.put(_DONE)

    def _train(self) -> TrainResult | BaseException:
        try:
            tracker = ProgressTracker(self.config, len(self.x), self._events.put, self.cancelled)
            self.adapter.train(self.x, self.y, self.config, tracker)
            return tracker.result()
        except BaseException as exc:  # handed to the RPC thread, which reports it
            return exc

    def _kept_finite(self, outcome: TrainResult | BaseException, start_weights: codec.WeightSet) -> tuple[TrainResult | BaseException, str]:
        """Finished or not, training moved the weights; non-finite weights are never kept: the weights
        from before are put back and the outcome becomes TrainingDiverged. Also the final checksum."""
        weights = self.adapter.get_weights()
        broken = next((f"tensor {name}" for name, array in weights.items() if not np.isfinite(array).all()), None)
        if broken is None and isinstance(outcome, NonFiniteLoss):
            broken = "the loss"
        if broken is not None:
            self.adapter.set_weights(start_weights)
            weights = start_weights
            outcome = TrainingDiverged(broken, self.config)
        return outcome, codec.weights_sha256(weights)
