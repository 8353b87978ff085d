"""Twin training: every worker starts from the same weights and trains on the same batches, in the
same order, with the same objective and hyperparameters; at checkpoints the coordinator pulls all
weights and measures how far the frameworks have drifted apart.

Checkpoints: before training, after the first step, every `--every-steps` steps and at each epoch's
end. Between two checkpoints each worker trains the steps in between (TrainRequest.start_step,
max_steps) with its optimizer state kept (keep_optimizer), so the pieces add up to one schedule.
Per pair of workers and checkpoint: per-tensor relative L2 distance ||a - b|| / max(||a||, ||b||)
and max |a - b|, the same over the whole set, and test-set prediction disagreement; per worker:
accuracy, loss, confusion matrix and weights checksum.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import RunConfig
from coordinator.records import Drift, PerTensor, RunInfo, StepCount, TwinResults, TwinStep, WorkerState, to_json
from coordinator.session import EventSink, Session, Worker
from weightrelay import codec
from weightrelay.v1 import worker_pb2 as pb


def checkpoint_steps(total: int, per_epoch: int, every: int) -> list[int]:
    """Steps after which to measure: 1, every `every`, each epoch's end, the last (sorted, unique)."""
    steps = {1, total} | {e * per_epoch for e in range(1, total // per_epoch + 1)}
    if every:
        steps |= set(range(every, total + 1, every))
    return sorted(s for s in steps if 1 <= s <= total)


def distance(a: codec.WeightSet, b: codec.WeightSet) -> Drift:
    """Per tensor and overall: relative L2 distance and max |a - b|."""
    relative, largest = {}, {}
    diff_sq = norm_a = norm_b = 0.0
    for name in a:
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        d, na, nb = float(np.sum((x - y) ** 2)), float(np.sum(x * x)), float(np.sum(y * y))
        relative[name] = (d ** 0.5) / max(na ** 0.5, nb ** 0.5, 1e-30)
        largest[name] = float(np.abs(x - y).max()) if x.size else 0.0
        diff_sq, norm_a, norm_b = diff_sq + d, norm_a + na, norm_b + nb
    return Drift(diff_sq ** 0.5 / max(norm_a ** 0.5, norm_b ** 0.5, 1e-30), max(largest.values(), default=0.0),
                 PerTensor(relative, largest))


class Twin:
    """One shared schedule over a session's workers, measured at checkpoints (not resumable)."""

    def __init__(self, config: RunConfig, run_dir: Path, on_event: EventSink):
        self.config = config
        self.session = Session(config, run_dir, on_event)
        self.results = TwinResults(run=RunInfo(config=config.to_dict()))

    def _train_piece(self, worker: Worker, start: int, count: int) -> pb.TrainSummary:
        request = self.session.train_request(worker, self.config.train_seed(0), start_step=start, max_steps=count, keep_optimizer=start > 0)
        return self.session.call(worker, f"{worker.name} trains steps {start + 1}-{start + count} (Train)", None,
                                 lambda: worker.client.train_to_end(request, timeout=self.config.train_deadline()), settings=True)

    def _measure(self, step: int, epoch: float) -> TwinStep:
        call, workers = self.session.call, self.session.workers
        weights = {name: call(w, f"{name} at step {step} (GetWeights)", None, w.client.get_weights) for name, w in workers.items()}
        replies = {name: call(w, f"{name} at step {step} (Evaluate)", None, lambda w=w: w.client.evaluate(True, False))
                   for name, w in workers.items()}
        pairs = {}
        for a, b in itertools.combinations(workers, 2):
            pair = distance(weights[a], weights[b])
            pair.differing_predictions = int((np.asarray(replies[a].predictions) != np.asarray(replies[b].predictions)).sum())
            pairs[f"{a}/{b}"] = pair
        record = TwinStep(step, epoch, pairs, {
            name: WorkerState(r.accuracy, r.loss, r.weights_sha256, [list(row.counts) for row in r.confusion_matrix])
            for name, r in replies.items()
        })
        self.session.on_event("checkpoint", to_json(record))
        return record

    def _same_start(self, ring: list[Worker]) -> None:
        """Every worker from the first one's initial weights."""
        first_weights = self.session.call(ring[0], "GetWeights", None, ring[0].client.get_weights)
        for other in ring[1:]:
            self.session.call(other, "SetWeights", None, lambda o=other: o.client.set_weights(first_weights))

    def _schedule(self, first: Worker) -> StepCount:
        samples = first.describe.dataset.train_samples
        samples = min(self.config.max_train_samples or samples, samples)
        per_epoch = -(-samples // self.config.batch_size)
        return StepCount(per_epoch, self.config.epochs * per_epoch)

    def _train_and_measure(self, ring: list[Worker], schedule: StepCount) -> None:
        """All workers train the same steps side by side up to each checkpoint, where they are measured."""
        done = 0
        with ThreadPoolExecutor(max_workers=len(ring)) as pool:
            for step in checkpoint_steps(schedule.total, schedule.per_epoch, self.config.every_steps):
                self.session.on_event("step", {"round": None, "step": f"all train steps {done + 1}-{step} of {schedule.total}"})
                started = time.perf_counter()
                list(pool.map(lambda w: self._train_piece(w, done, step - done), ring))
                record = self._measure(step, step / schedule.per_epoch)
                record.train_seconds = time.perf_counter() - started
                self.results.checkpoints.append(record)
                self.session.save(self.results)
                done = step

    def run(self, addresses: dict[str, str], previous: dict[str, Any] | None = None) -> TwinResults:
        """The whole run (`previous` is not taken: a twin run is not resumed)."""
        session = self.session
        session.run_dir.mkdir(parents=True, exist_ok=True)
        self.results.run.order = list(addresses)
        with session.recorded(self.results):
            session.connect(addresses, lambda name: self.config.twin_objective)
            session.initialize()
            session.start(self.results.run)
            ring = list(session.workers.values())
            self._same_start(ring)
            self.results.steps = self._schedule(ring[0])
            self.results.checkpoints.append(self._measure(0, 0.0))
            self._train_and_measure(ring, self.results.steps)
        return self.results
