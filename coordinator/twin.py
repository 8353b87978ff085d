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
from datetime import datetime, timezone
from typing import Any

import numpy as np

import weightrelay
from coordinator.errors import UsageError
from coordinator.relay import Relay, Worker
from coordinator.results import SCHEMA_VERSION, message_to_dict
from weightrelay import codec
from weightrelay.v1 import worker_pb2 as pb


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def checkpoint_steps(total: int, per_epoch: int, every: int) -> list[int]:
    """Steps after which to measure: 1, every `every`, each epoch's end, the last (sorted, unique)."""
    steps = {1, total} | {e * per_epoch for e in range(1, total // per_epoch + 1)}
    if every:
        steps |= set(range(every, total + 1, every))
    return sorted(s for s in steps if 1 <= s <= total)


def distance(a: codec.WeightSet, b: codec.WeightSet) -> dict[str, Any]:
    """Per tensor and overall: relative L2 distance and max |a - b|."""
    relative, largest = {}, {}
    diff_sq = norm_a = norm_b = 0.0
    for name in a:
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        d, na, nb = float(np.sum((x - y) ** 2)), float(np.sum(x * x)), float(np.sum(y * y))
        relative[name] = (d ** 0.5) / max(na ** 0.5, nb ** 0.5, 1e-30)
        largest[name] = float(np.abs(x - y).max()) if x.size else 0.0
        diff_sq, norm_a, norm_b = diff_sq + d, norm_a + na, norm_b + nb
    return {
        "relative_l2": diff_sq ** 0.5 / max(norm_a ** 0.5, norm_b ** 0.5, 1e-30),
        "max_abs": max(largest.values(), default=0.0),
        "per_tensor": {"relative_l2": relative, "max_abs": largest},
    }


class Twin(Relay):
    """Reuses the relay's connection, Initialize, checks and calls; replaces the rounds with one shared schedule."""

    def _train_piece(self, worker: Worker, start: int, count: int) -> pb.TrainSummary:
        c = self.config
        request = pb.TrainRequest(
            epochs=c.epochs, batch_size=c.batch_size, learning_rate=c.lr, momentum=c.momentum, seed=c.train_seed(0),
            objective=worker.objective, max_samples=c.max_train_samples, start_step=start, max_steps=count,
            keep_optimizer=start > 0,
        )
        return self._call(worker, f"{worker.name} trains steps {start + 1}-{start + count} (Train)", None,
                          lambda: worker.client.train_to_end(request, timeout=c.train_deadline()))

    def _measure(self, step: int, epoch: float) -> dict[str, Any]:
        weights = {name: self._call(w, f"{name} at step {step} (GetWeights)", None, w.client.get_weights) for name, w in self.workers.items()}
        replies = {name: self._call(w, f"{name} at step {step} (Evaluate)", None, lambda w=w: w.client.evaluate(True, False))
                   for name, w in self.workers.items()}
        pairs = {}
        for a, b in itertools.combinations(self.workers, 2):
            pair = distance(weights[a], weights[b])
            pair["differing_predictions"] = int((np.asarray(replies[a].predictions) != np.asarray(replies[b].predictions)).sum())
            pairs[f"{a}/{b}"] = pair
        record = {
            "step": step,
            "epoch": epoch,
            "pairs": pairs,
            "workers": {
                name: {"accuracy": r.accuracy, "loss": r.loss, "weights_sha256": r.weights_sha256,
                       "confusion_matrix": [list(row.counts) for row in r.confusion_matrix]}
                for name, r in replies.items()
            },
        }
        self.on_event("checkpoint", record)
        return record

    def run(self, addresses: dict[str, str], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        if len(addresses) < 2:
            raise UsageError("twin training needs at least two workers (e.g. --local --workers torch,torch-b)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.results = {
            "schema_version": SCHEMA_VERSION, "kind": "twin", "weightrelay_version": weightrelay.__version__,
            "status": "running", "started_at": _now(), "finished_at": None, "config": self.config.to_dict(),
            "workers": {}, "order": list(addresses), "objectives": {}, "checkpoints": [],
        }
        with self._recorded(resumable=False):
            self.connect(addresses)
            for worker in self.workers.values():
                worker.objective = self.config.twin_objective
            self.initialize()
            self.results.update(
                workers={name: {"address": w.client.address, **message_to_dict(w.describe)} for name, w in self.workers.items()},
                objectives={name: w.objective for name, w in self.workers.items()},
            )
            self.check_compatible()
            self.on_event("start", {"run_dir": str(self.run_dir), "config": self.config.to_dict(), "workers": self.results["workers"]})
            ring = list(self.workers.values())
            first_weights = self._call(ring[0], "GetWeights", None, ring[0].client.get_weights)
            for other in ring[1:]:  # one starting point for all
                self._call(other, "SetWeights", None, lambda o=other: o.client.set_weights(first_weights))

            samples = ring[0].describe.dataset.train_samples
            samples = min(self.config.max_train_samples or samples, samples)
            per_epoch = -(-samples // self.config.batch_size)
            total = self.config.epochs * per_epoch
            self.results["steps"] = {"per_epoch": per_epoch, "total": total}
            self.results["checkpoints"].append(self._measure(0, 0.0))
            done = 0
            with ThreadPoolExecutor(max_workers=len(ring)) as pool:
                for step in checkpoint_steps(total, per_epoch, self.config.every_steps):
                    self.on_event("step", {"round": None, "step": f"all train steps {done + 1}-{step} of {total}"})
                    started = time.perf_counter()
                    list(pool.map(lambda w: self._train_piece(w, done, step - done), ring))
                    record = self._measure(step, step / per_epoch)
                    record["train_seconds"] = time.perf_counter() - started
                    self.results["checkpoints"].append(record)
                    self._save()
                    done = step
        return self.results
