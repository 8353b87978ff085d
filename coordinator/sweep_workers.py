"""Where a sweep's runs find their workers: sets of workers, each serving one run at a time.

A `Placer` starts a set of named workers for a run's settings (`--local`: child processes on
127.0.0.1; `--ray`: actors on a Ray cluster, `coordinator.ray_workers`). A set serves the runs of
one sweep slot one after another, each run Initializing it afresh (a clean start, so a run
against a set that served another run repeats exactly), and is replaced when it dies or a run on
it fails: a run's workers are its own until it ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from coordinator.config import RunConfig
from coordinator.local import LocalWorkers


class WorkerSet(Protocol):
    #: {name: HOST:PORT}, in the order the run names its workers
    addresses: dict[str, str]
    #: {name: where it runs}: "local" or a Ray node id
    nodes: dict[str, str]

    def alive(self) -> bool:
        """Whether every worker of the set still runs (a dead one is replaced before the next run)."""

    def stop(self) -> None:
        """Stop every worker of the set (also a half-started one); safe to call twice."""


class Placer(Protocol):
    def start(self, names: tuple[str, ...], config: RunConfig, log_dir: Path) -> WorkerSet:
        """A new set of the workers `names` for runs of `config`'s data set."""

    def close(self) -> None:
        """Release what the placer holds (a Ray connection)."""


def set_key(names: tuple[str, ...], config: RunConfig) -> tuple:
    """What a set of workers is started for: a run whose key differs gets a new set (the model and the
    seed are not in it: every run's Initialize builds its own)."""
    return names, config.dataset, config.data_dir


class LocalSet:
    """Workers as child processes of the sweep, on free ports of 127.0.0.1 (as `coordinator run --local`)."""

    def __init__(self, names: tuple[str, ...], config: RunConfig, log_dir: Path):
        self._workers = LocalWorkers(log_dir, config.seed, config.data_dir, config.dataset, config.model, names=names)
        self.addresses = self._workers.__enter__()
        self.nodes = {name: "local" for name in names}

    def alive(self) -> bool:
        return all(worker.process.poll() is None for worker in self._workers.workers)

    def stop(self) -> None:
        self._workers.stop()


class LocalPlacer:
    def start(self, names: tuple[str, ...], config: RunConfig, log_dir: Path) -> WorkerSet:
        return LocalSet(names, config, log_dir)

    def close(self) -> None:
        pass
