"""The experiment: relay one set of weights around a ring of named workers for N rounds.

Each round, for each worker W of the ring in turn, with N the next one (the last hands back
to the first): W trains -> the weights move from W to N -> W and N evaluate them at the same
time (`W_trained`, `N_from_W`). With the default ring torch, keras that is torch_trained, keras_from_torch,
keras_trained, torch_from_keras. At each move the receiver's predictions are compared with the
sender's on the whole test set. The coordinator speaks of named workers only; which framework
each one runs is what its Describe says.

The parts: `coordinator.session` (connect, initialize, check, calls, the final status),
`coordinator.steps` (train, move, evaluate), `coordinator.checkpoint` (the weights kept after each
round), `coordinator.records` (what results.json holds). Here: the order of the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from coordinator import checkpoint
from coordinator.config import RunConfig
from coordinator.records import InitialSync, RelayResults, Resumed, Round, RunInfo, from_json, now
from coordinator.results import swap_pairs, upgrade
from coordinator.session import EventSink, Session, Worker
from coordinator.steps import Steps


class Relay:
    def __init__(self, config: RunConfig, run_dir: Path, on_event: EventSink):
        self.config = config
        self.session = Session(config, run_dir, on_event)
        self.results = RelayResults()

    def _start(self, previous: dict[str, Any] | None) -> None:
        """A new record, or `previous`'s (a failed or interrupted run's results) continued with this run's settings."""
        if previous is None:
            self.results = RelayResults(RunInfo(config=self.config.to_dict()))
            return
        self.results = from_json(RelayResults, upgrade(previous))
        run = self.results.run
        run.status, run.finished_at, run.error, run.config = "running", None, None, self.config.to_dict()
        self.results.resumed.append(Resumed(now(), len(self.results.rounds)))

    def _initial_sync(self, steps: Steps, ring: list[Worker]) -> None:
        """Every worker starts from the first one's initial weights."""
        first = ring[0]
        initial, first_reply = steps.evaluate(first, f"{first.name}_initial", None)
        sync = InitialSync([initial], [])
        for other in ring[1:]:
            move, evaluation = steps.measured_move(first, other, first_reply, f"{other.name}_initial", None)
            sync.evaluations.append(evaluation)
            sync.moves.append(move)
        self.results.initial_sync = sync
        self.session.save(self.results)

    def _round(self, steps: Steps, ring: list[Worker], r: int) -> Round:
        started = time.perf_counter()
        item = Round(r, [], {}, [], 0.0)
        for i, worker in enumerate(ring):
            receiver = ring[(i + 1) % len(ring)]
            item.train[worker.name] = steps.train(worker, r)
            move, trained, received = steps.hand_on(worker, receiver, item.train[worker.name].summary.weights_sha256, r)
            item.evaluations += [trained, received]
            item.moves.append(move)
        item.wall_seconds = time.perf_counter() - started
        return item

    def _keep(self, item: Round) -> None:
        """Record a completed round with its weights; the previous round's weights go once results.json names the new ones."""
        saved = checkpoint.take(self.session, item.round)
        self.results.rounds.append(item)
        previous, self.results.checkpoint = self.results.checkpoint, saved
        self.session.save(self.results)
        if previous and previous.round != item.round:
            checkpoint.remove_round(self.session.run_dir, previous.round, list(self.session.workers))
        self.session.on_event("round_done", {"round": item.round, "rounds": self.config.rounds, "wall_seconds": item.wall_seconds})

    def run(self, addresses: dict[str, str], previous: dict[str, Any] | None = None) -> RelayResults:
        """The whole run; with `previous` (a failed or interrupted run's results) it continues from its first
        unfinished round, with the weights saved after the last finished one."""
        session = self.session
        session.run_dir.mkdir(parents=True, exist_ok=True)
        self._start(previous)
        with session.recorded(self.results, kept=lambda: len(self.results.rounds)):
            names = self.config.ring(list(addresses))
            session.connect({name: addresses[name] for name in names}, self.config.objective_for)
            pairs = swap_pairs(w.objective for w in session.workers.values())
            session.initialize(resumed=previous is not None)
            self.results.run.order = names
            self.results.swap_pairs = pairs
            session.start(self.results.run)
            ring = [session.workers[name] for name in names]
            with Steps(session, pairs) as steps:
                first = len(self.results.rounds)
                if first:
                    checkpoint.restore(session, self.results.checkpoint)
                else:
                    self._initial_sync(steps, ring)
                for r in range(first, self.config.rounds):
                    self._keep(self._round(steps, ring, r))
        return self.results
