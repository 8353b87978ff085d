"""A sweep file: the settings of many runs, read and checked whole before any run starts.

    seeds = 5                      # or a list: seeds = [0, 1, 7]
    retries = 3                    # a run whose workers die is started again this often (default 3)
    differences = ["torch_trained - keras_trained"]   # paired over seeds (default: every two trained phases)

    [base]                         # any `coordinator run` setting, or mode = "twin" and twin settings
    rounds = 5
    max_train_samples = 10000

    [grid]                         # lists, crossed: every combination is a point
    torch_objective = ["swap:1,7", "swap:3,8"]

    [resources]                    # --ray: what each worker's actor asks of the cluster, per framework
    torch = { num_gpus = 1 }

A point x seed is the settings a `coordinator run --config BASE --seed SEED` with the point's
values would resolve (`coordinator.config.settle`, then `coordinator.checks.check_settings`): a
setting no run would accept is refused here, naming its key in the file, with exit code 2.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator import config as cfg
from coordinator import validators as v
from coordinator.checks import check_settings
from coordinator.errors import CoordinatorError, UsageError
from coordinator.local import WORKER_MODULES, framework_of
from coordinator.results import ring_phases

MODES = ("relay", "twin")
DEFAULT_RETRIES = 3
TOP_LEVEL = ("seeds", "retries", "differences", "base", "grid", "resources")
#: What a sweep decides itself: the seeds come from `seeds`, the workers are started for each run.
NOT_SWEPT = {"seed": "give the seeds with the top-level key seeds = N or seeds = [...]",
             "local": "the sweep starts every run's workers itself (--local or --ray)",
             "worker": "the sweep starts every run's workers itself; name them with workers = \"torch,keras\""}
NOT_IN_GRID = {"out": "the sweep's runs all go under SWEEP_DIR/runs/"}
#: What a Ray actor may ask for, per framework (Ray's own option names).
#: The address of a worker not placed yet (a run's workers are placed when it starts).
PLACEHOLDER = "127.0.0.1:1"
RESOURCE_KEYS = {"num_cpus": v.number, "num_gpus": v.number, "memory": v.non_negative_int}


@dataclass(frozen=True)
class Point:
    """One combination of the grid's values, and the settings its runs share."""

    index: int
    values: dict[str, Any]   # the grid's keys and this point's values, as the file spells them

    @property
    def name(self) -> str:
        return f"p{self.index}"

    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.values.items())


@dataclass
class SweepSpec:
    """A checked sweep file."""

    path: Path
    mode: str
    base: cfg.Layer
    grid: dict[str, list[Any]]
    seeds: list[int]
    retries: int = DEFAULT_RETRIES
    differences: list[tuple[str, str]] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)

    def settings(self, point: Point, seed: int, placed: str = "local") -> cfg.Settings:
        """The settings of one run: defaults < [base] < the point's grid values < its seed. `placed`
        "local" resolves them for --local workers; "ray" for workers at addresses given per run
        (placeholders until the run's workers are placed)."""
        grid = cfg.Layer({key.replace("-", "_"): value for key, value in point.values.items()},
                         {key.replace("-", "_"): f"key grid.{key} of sweep file {self.path}" for key in point.values})
        named = {"seed": f"seed {seed} of key seeds of sweep file {self.path}"}
        settings = cfg.settle(self.base, grid, cfg.Layer({"seed": seed, "local": True}, named))
        if placed == "local":
            return settings
        placeholders = [f"{name}={PLACEHOLDER}" for name in settings.config.local_names()]
        return cfg.settle(self.base, grid, cfg.Layer({"seed": seed, "local": False, "worker": placeholders}, named))

    def names(self, point: Point) -> tuple[str, ...]:
        """The workers of the point's runs (its `workers` setting, default torch,keras)."""
        return self.settings(point, self.seeds[0]).config.local_names()


def _fail(path: Path, message: str) -> UsageError:
    return UsageError(f"sweep file {path}: {message}")


def _setting(path: Path, where: str, raw_key: str, value: Any, grid: bool) -> tuple[str, Any]:
    key = raw_key.replace("-", "_")
    if key not in cfg.VALIDATORS:
        raise _fail(path, f"unknown setting {where}.{raw_key}; known settings: {', '.join(k for k in cfg.VALIDATORS if k not in NOT_SWEPT)}")
    refused = NOT_SWEPT.get(key) or (cfg.ALIASES[key].setting == "worker" and NOT_SWEPT["worker"] if key in cfg.ALIASES else None)
    if grid and not refused:
        refused = NOT_IN_GRID.get(key)
    if refused:
        raise _fail(path, f"key {where}.{raw_key} cannot be set in a sweep: {refused}")
    try:
        return key, cfg.VALIDATORS[key](value)
    except ValueError as exc:
        raise _fail(path, f"key {where}.{raw_key}: {exc}") from None


def _seeds(path: Path, value: Any) -> list[int]:
    if isinstance(value, list):
        if not value:
            raise _fail(path, "key seeds is an empty list: give at least one seed")
        try:
            seeds = [v.seed(item) for item in value]
        except ValueError as exc:
            raise _fail(path, f"key seeds: {exc}") from None
        if len(set(seeds)) != len(seeds):
            raise _fail(path, f"key seeds {value}: give each seed once")
        return seeds
    try:
        return list(range(v.positive_int(value)))
    except ValueError as exc:
        raise _fail(path, f"key seeds: {exc} (a count, or a list of seeds)") from None


def _resources(path: Path, table: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(table, dict):
        raise _fail(path, "[resources] must be a table of frameworks, e.g. torch = { num_gpus = 1 }")
    resources: dict[str, dict[str, Any]] = {}
    for framework, asked in table.items():
        if framework not in WORKER_MODULES:
            raise _fail(path, f"unknown framework resources.{framework}; frameworks: {', '.join(WORKER_MODULES)}")
        if not isinstance(asked, dict):
            raise _fail(path, f"resources.{framework} must be a table, e.g. {{ num_cpus = 1, num_gpus = 1 }}")
        resources[framework] = {}
        for key, value in asked.items():
            if key not in RESOURCE_KEYS:
                raise _fail(path, f"unknown key resources.{framework}.{key}; known keys: {', '.join(RESOURCE_KEYS)}")
            try:
                resources[framework][key] = RESOURCE_KEYS[key](value)
            except ValueError as exc:
                raise _fail(path, f"key resources.{framework}.{key}: {exc}") from None
            if resources[framework][key] < 0:
                raise _fail(path, f"key resources.{framework}.{key}: {value} must be 0 or more")
    return resources


def _differences(path: Path, value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(path, 'key differences must be a list like ["torch_trained - keras_trained"]')
    pairs = []
    for item in value:
        a, sep, b = item.partition(" - ")
        if not sep or not a.strip() or not b.strip():
            raise _fail(path, f"key differences: {item!r} is not \"PHASE_A - PHASE_B\" (e.g. \"torch_trained - keras_trained\")")
        pairs.append((a.strip(), b.strip()))
    return pairs


def compared(spec: SweepSpec, point: Point) -> list[tuple[str, str]]:
    """The paired differences of a point: the file's, else every two trained phases of the ring
    (relay) or every two workers (twin), in ring order."""
    if spec.differences:
        return list(spec.differences)
    config = spec.settings(point, spec.seeds[0]).config
    if spec.mode == "twin":
        return list(itertools.combinations(config.local_names(), 2))
    ring = config.ring(list(config.local_names()))
    return list(itertools.combinations([f"{name}_trained" for name in ring], 2))


def _check_differences(spec: SweepSpec, point: Point) -> None:
    if not spec.differences:
        return
    config = spec.settings(point, spec.seeds[0]).config
    names = list(config.local_names())
    known = names if spec.mode == "twin" else [phase for phase, _ in ring_phases(config.ring(names))]
    for a, b in spec.differences:
        for side in (a, b):
            if side not in known:
                raise _fail(spec.path, f"key differences: {side!r} is no {'worker' if spec.mode == 'twin' else 'phase'} of point "
                                       f"{point.name} ({point.label()}); it has {', '.join(known)}")


def read_sweep(path: Path | str, placed: str = "local") -> SweepSpec:
    """The checked sweep file; UsageError (exit 2) naming the key for anything no run would accept.
    `placed`: "local" or "ray", where the runs' workers start (the data set is looked for on this
    machine only for local workers)."""
    path = Path(path)
    document = cfg.read_toml(path, "sweep file")
    for key in document:
        if key not in TOP_LEVEL:
            raise _fail(path, f"unknown key {key!r}; a sweep file has {', '.join(TOP_LEVEL)}")
    base_table = document.get("base", {})
    grid_table = document.get("grid")
    if not isinstance(base_table, dict):
        raise _fail(path, "base must be a table: [base] with the settings every run shares")
    if not isinstance(grid_table, dict) or not grid_table:
        raise _fail(path, "the grid is empty: give [grid] with at least one setting and its values, e.g. lr = [0.01, 0.05]")
    if "seeds" not in document:
        raise _fail(path, "no seeds: give seeds = N (seeds 0 to N-1) or seeds = [...]")

    mode = base_table.get("mode", "relay")
    if mode not in MODES:
        raise _fail(path, f"key base.mode {mode!r}: use {' or '.join(MODES)}")
    base = cfg.Layer({}, source=f"sweep file {path}")
    for raw_key, value in base_table.items():
        if raw_key == "mode":
            continue
        key, checked = _setting(path, "base", raw_key, value, grid=False)
        base.values[key] = checked
        base.names[key] = f"key base.{raw_key} of sweep file {path}"
    grid: dict[str, list[Any]] = {}
    for raw_key, values in grid_table.items():
        if raw_key.replace("-", "_") not in cfg.VALIDATORS:
            _setting(path, "grid", raw_key, None, grid=True)  # names the unknown setting
        if not isinstance(values, list):
            raise _fail(path, f"key grid.{raw_key} must be a list of values, e.g. [{values!r}]")
        if not values:
            raise _fail(path, f"key grid.{raw_key} is an empty list: give at least one value")
        grid[raw_key] = [_setting(path, "grid", raw_key, value, grid=True)[1] for value in values]

    spec = SweepSpec(path, mode, base, grid, _seeds(path, document["seeds"]),
                     differences=_differences(path, document.get("differences", [])),
                     resources=_resources(path, document.get("resources", {})))
    try:
        spec.retries = v.non_negative_int(document.get("retries", DEFAULT_RETRIES))
    except ValueError as exc:
        raise _fail(path, f"key retries: {exc}") from None
    spec.points = [Point(i, dict(zip(grid, combination))) for i, combination in enumerate(itertools.product(*grid.values()))]
    for point in spec.points:
        for seed in spec.seeds:
            settings = spec.settings(point, seed, placed)
            for name in settings.config.local_names():
                try:
                    framework_of(name)
                except CoordinatorError as exc:
                    raise _fail(path, f"point {point.name} ({point.label()}): {settings.where('workers')}: {exc}") from None
            try:
                check_settings(settings, mode)
            except UsageError as exc:
                raise _fail(path, f"point {point.name} ({point.label()}), seed {seed}: {exc}") from None
        _check_differences(spec, point)
    return spec
