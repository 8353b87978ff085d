"""The settings of one run: defaults, a TOML file, then flags, in that order of precedence.

Workers are named: `worker = ["NAME=HOST:PORT", ...]` says which workers a run uses and where,
`objective = ["NAME=OBJECTIVE", ...]` what each trains on, `workers` which ones `--local` starts.
A run whose settings name none has the default workers (`DEFAULT_WORKERS`, a table: nothing here
branches on a worker's name). Each default worker keeps the flags and keys it had when it was one
of the only two, `--NAME HOST:PORT` and `--NAME-objective OBJ` (keys `NAME`, `NAME_objective`):
aliases that fill the named settings, so old command lines and old `config.toml` files mean what
they meant.

The resolved settings are saved in the run directory as `config.toml`, which `coordinator run
--config` takes back, so any run can be repeated exactly.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from coordinator import validators as v
from coordinator.errors import UsageError
from weightrelay import defaults, leases, models
from weightrelay.data import DEFAULT_DATASET


@dataclass(frozen=True)
class DefaultWorker:
    """A worker a run has when its settings name none: where it is (an environment variable, else a
    loopback port) and the labels it trains on unless the settings say otherwise."""

    name: str
    address_env: str
    loopback: str
    objective: str

    def address(self) -> str:
        return os.environ.get(self.address_env) or self.loopback


#: The default workers, in ring order. The compose file and the Kubernetes job point the
#: environment variables at the worker containers.
DEFAULT_WORKERS: tuple[DefaultWorker, ...] = (
    DefaultWorker("torch", "WEIGHTRELAY_TORCH_ADDRESS", "127.0.0.1:50051", "swap:1,7"),
    DefaultWorker("keras", "WEIGHTRELAY_KERAS_ADDRESS", "127.0.0.1:50052", "identity"),
)
DEFAULT_OBJECTIVES: dict[str, str] = {d.name: d.objective for d in DEFAULT_WORKERS}
#: A round's Train seed is --seed x this + the round: every round shuffles differently.
ROUND_SEED_STRIDE = 100_003
#: The objective of a worker that neither the settings nor the default workers give one.
FALLBACK_OBJECTIVE = "identity"


@dataclass(frozen=True)
class Alias:
    """A key (and flag) that sets one named worker's address (`setting` "worker") or objective ("objective")."""

    key: str
    setting: str
    worker: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


ALIASES: dict[str, Alias] = {
    alias.key: alias for d in DEFAULT_WORKERS
    for alias in (Alias(d.name, "worker", d.name), Alias(f"{d.name}_objective", "objective", d.name))
}


def _default_worker_entries() -> list[str]:
    return [f"{d.name}={d.address()}" for d in DEFAULT_WORKERS]


@dataclass
class RunConfig:
    rounds: int = 20
    local: bool = False
    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    lr: float = defaults.LEARNING_RATE
    momentum: float = defaults.MOMENTUM
    seed: int = 0
    model: str = models.DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    data_dir: str | None = None
    out: str = "runs"
    max_train_samples: int = 0
    connect_timeout: float = 15.0
    call_timeout: float = 300.0     # deadline of each Describe, Initialize, Evaluate, GetWeights and SetWeights
    train_timeout: float = 1800.0   # per epoch: a Train's deadline is epochs x this
    lease_seconds: int = leases.DEFAULT_SECONDS  # each worker's lease, renewed every third of it while the run lives
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token_file: str | None = None   # the path only: the token itself is never written to the run directory
    #: NAME=HOST:PORT of the workers to connect to (not --local), in ring order; default: DEFAULT_WORKERS
    worker: list[str] = field(default_factory=_default_worker_entries)
    workers: str = ""                                    # --local: the workers to start, e.g. "torch,keras,jax"
    order: str = ""                                      # the relay ring, e.g. "jax,torch,keras" (default: as given)
    #: NAME=OBJECTIVE; a worker not named trains its default worker's objective, else identity
    objective: list[str] = field(default_factory=list)
    via_coordinator: bool = False                        # move weights through the coordinator, not worker to worker
    every_steps: int = 0                                 # twin: also measure every K steps
    twin_objective: str = "identity"                     # twin: the objective every worker trains
    mlflow: str = ""                                     # an MLflow tracking URI to log the run to (coordinator.tracking)
    mlflow_experiment: str = "weightrelay"               # the MLflow experiment of its runs
    tensorboard: str = ""                                # a directory for TensorBoard event files, one folder per run

    def addresses(self) -> dict[str, str]:
        """{name: HOST:PORT} of the workers to connect to (not --local), in the order given."""
        return dict(v.split_named(entry) for entry in self.worker)

    def local_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.workers.split(",") if n.strip()) or tuple(d.name for d in DEFAULT_WORKERS)

    def names(self) -> list[str]:
        """The names of this run's workers, in the order given."""
        return list(self.local_names()) if self.local else list(self.addresses())

    def ring(self, names: list[str], where: str = "--order") -> list[str]:
        """The relay ring over the workers: --order (given as `where` says), else the order they were given in."""
        if not self.order:
            return list(names)
        ring = [n.strip() for n in self.order.split(",") if n.strip()]
        if sorted(ring) != sorted(names):
            raise UsageError(f"{where} {self.order}: name each worker once ({', '.join(names)})")
        return ring

    def objectives(self) -> dict[str, str]:
        """{name: objective} as `objective` gives them (the workers it does not name are not in it)."""
        return dict(v.split_named(entry) for entry in self.objective)

    def objective_for(self, name: str) -> str:
        """--objective NAME=OBJ; else the default worker NAME's objective; else identity."""
        return self.objectives().get(name) or DEFAULT_OBJECTIVES.get(name, FALLBACK_OBJECTIVE)

    def train_deadline(self) -> float:
        return self.epochs * self.train_timeout

    def train_seed(self, round_index: int) -> int:
        """Each round shuffles differently, reproducibly from --seed."""
        return self.seed * ROUND_SEED_STRIDE + round_index

    def to_dict(self) -> dict[str, Any]:
        """The settings as results.json records them: every setting, and each alias with the value
        it has in this run (a default worker not in the run: its default address), as readers of
        results from before named workers expect."""
        settings = asdict(self)
        addresses = self.addresses()
        for alias in ALIASES.values():
            if alias.setting == "worker":
                settings[alias.key] = addresses.get(alias.worker) or _DEFAULT_BY_NAME[alias.worker].address()
            else:
                settings[alias.key] = self.objective_for(alias.worker)
        return settings


_DEFAULT_BY_NAME = {d.name: d for d in DEFAULT_WORKERS}

VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "rounds": v.positive_int,
    "local": v.boolean,
    "epochs": v.epochs,
    "batch_size": v.positive_int,
    "lr": v.learning_rate,
    "momentum": v.momentum,
    "seed": v.seed,
    "model": v.model,
    "dataset": v.text,
    "data_dir": v.text,
    "out": v.text,
    "max_train_samples": v.non_negative_int,
    "connect_timeout": v.positive_number,
    "call_timeout": v.positive_number,
    "train_timeout": v.positive_number,
    "lease_seconds": v.lease_seconds,
    "tls_ca": v.text,
    "tls_cert": v.text,
    "tls_key": v.text,
    "tls_server_name": v.text,
    "token_file": v.text,
    "worker": v.list_of(v.named_address),
    "workers": v.name_list,
    "order": v.name_list,
    "objective": v.list_of(v.named_objective),
    "via_coordinator": v.boolean,
    "every_steps": v.non_negative_int,
    "twin_objective": v.objective,
    "mlflow": v.text,
    "mlflow_experiment": v.text,
    "tensorboard": v.text,
    **{alias.key: v.address if alias.setting == "worker" else v.objective for alias in ALIASES.values()},
}
#: How a repeatable flag checks each of its values (the config file gives the whole list).
ITEM_VALIDATORS: dict[str, Callable[[Any], Any]] = {"worker": v.named_address, "objective": v.named_objective}
assert set(VALIDATORS) == {f.name for f in fields(RunConfig)} | set(ALIASES)

#: Settings that only one kind of run reads (a report shows a run the settings that applied to it).
RELAY_ONLY = frozenset({"rounds", "order", "objective", "via_coordinator", *ALIASES})
TWIN_ONLY = frozenset({"every_steps", "twin_objective"})
LOCAL_ONLY = frozenset({"workers", "data_dir"})
REMOTE_ONLY = frozenset({"worker"} | {a.key for a in ALIASES.values() if a.setting == "worker"})


def applied(settings: dict[str, Any], kind: str, names: Iterable[str]) -> dict[str, Any]:
    """The settings of a results file's `config` that applied to its run: those of its kind
    ("relay" or "twin"), of local or remote workers as it had, and the aliases of its own workers."""
    names = set(names)
    skipped = set(TWIN_ONLY if kind == "relay" else RELAY_ONLY)
    skipped |= REMOTE_ONLY if settings.get("local") else LOCAL_ONLY
    skipped |= {a.key for a in ALIASES.values() if a.worker not in names}
    return {key: value for key, value in settings.items() if key not in skipped}


@dataclass
class Layer:
    """Checked settings from one source (the flags, a config file, a resumed run's config.toml),
    and how to name each of them there in a message."""

    values: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)
    source: str = ""  # a file; "" for the command line

    def where(self, key: str) -> str:
        if key in self.names:
            return self.names[key]
        return f"key {key} of {self.source}" if self.source else "--" + key.replace("_", "-")


@dataclass
class Settings:
    """Resolved settings, and where each one that is no default was given (for messages)."""

    config: RunConfig
    sources: dict[str, str] = field(default_factory=dict)

    def where(self, key: str, worker: str | None = None) -> str:
        """How the setting `key` (of worker `worker`, for `worker` and `objective`) was given:
        a flag, or a key and its file; the flag when it was a default."""
        given = self.sources.get(f"{key}:{worker}" if worker else key)
        return given or "--" + key.replace("_", "-")


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file's document; UsageError naming the file (as `what`) when it cannot be read or parsed."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from None


def read_layer(path: Path | str) -> Layer:
    """Checked settings from a TOML file: top-level keys, or a [run] table, named like the flags
    (`batch_size` or `batch-size`); the aliases of the default workers as well."""
    path = Path(path)
    document = read_toml(path)
    table = document.get("run", document)
    layer = Layer({}, source=f"config file {path}")
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in VALIDATORS:
            raise UsageError(f"config file {path}: unknown key {raw_key!r}; known keys: {', '.join(VALIDATORS)}")
        try:
            layer.values[key] = VALIDATORS[key](value)
        except ValueError as exc:
            raise UsageError(f"config file {path}: key {raw_key}: {exc}") from None
        layer.names[key] = f"key {raw_key} of config file {path}"
    return layer


def load_config_file(path: Path | str) -> dict[str, Any]:
    """The checked settings of a TOML file (see `read_layer`)."""
    return read_layer(path).values


class _Named:
    """The named settings (`worker`, `objective`) as the layers give them, with where each came from."""

    def __init__(self, sources: dict[str, str]):
        self.workers = RunConfig().addresses()
        self.objectives: dict[str, str] = {}
        self.by_alias: set[str] = set()  # objectives only an alias gave
        self.sources = sources

    def take(self, layer: Layer, given: dict[str, Any]) -> None:
        """This layer's named settings and aliases, taken out of `given`."""
        aliases = [(ALIASES[key], given.pop(key), layer.where(key)) for key in list(given) if key in ALIASES]
        listed = given.pop("worker", None)
        if listed:  # the list names the workers; its layer's address aliases are not used, as before
            self.workers = dict(v.split_named(entry) for entry in listed)
            self.sources.update({f"worker:{name}": layer.where("worker") for name in self.workers})
        else:
            for alias, value, where in aliases:
                if alias.setting == "worker" and alias.worker in self.workers:
                    self.workers[alias.worker] = value
                    self.sources[f"worker:{alias.worker}"] = where
        named = dict(v.split_named(entry) for entry in given.pop("objective", None) or [])
        self.sources.update({f"objective:{name}": layer.where("objective") for name in named})
        self.by_alias -= set(named)
        for alias, value, where in aliases:
            if alias.setting == "objective" and alias.worker not in named:
                self.objectives[alias.worker] = value
                self.sources[f"objective:{alias.worker}"] = where
                self.by_alias.add(alias.worker)
        self.objectives.update(named)

    def worker_entries(self) -> list[str]:
        return [f"{name}={address}" for name, address in self.workers.items()]

    def objective_entries(self, in_run: Iterable[str]) -> list[str]:
        """The objectives, less those only an alias gave that restate the default or name a worker the run lacks."""
        in_run = set(in_run)
        dropped = {name for name in self.by_alias if name not in in_run or self.objectives[name] == DEFAULT_OBJECTIVES[name]}
        return [f"{name}={objective}" for name, objective in self.objectives.items() if name not in dropped]


def settle(*layers: Layer | dict[str, Any]) -> Settings:
    """Defaults, overridden by each layer in turn (e.g. a resumed run's settings, a config file, the flags).

    `worker` and `objective` are named settings. A layer's `worker` list replaces the workers
    below it; its address aliases change the address of a worker already named (within the layer
    the list wins, as it did). Objectives are per worker: a layer's entries replace those of the
    same workers below; its objective aliases count where the layer's own list does not name the
    worker. An alias of a default worker that is not in the run says nothing (every config.toml
    saved before named workers has all the aliases, whatever its workers were).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    named = _Named(sources)
    for layer in layers:
        layer = layer if isinstance(layer, Layer) else Layer(dict(layer))
        given = dict(layer.values)
        named.take(layer, given)
        values.update(given)
        sources.update({key: layer.where(key) for key in given})
    config = RunConfig(**values, worker=named.worker_entries())
    config.objective = named.objective_entries(config.names())
    return Settings(config, sources)


def resolve(*layers: Layer | dict[str, Any]) -> RunConfig:
    """Defaults, overridden by each layer in turn (see `settle`)."""
    return settle(*layers).config


def to_toml(config: RunConfig) -> str:
    """The settings as a TOML file that `coordinator run --config` reads back."""
    lines = ["# Resolved settings of this run; repeat it with: coordinator run --config config.toml", "[run]"]
    for key, value in asdict(config).items():
        if value is None or value == [] or value == "":
            lines.append(f"# {key} is not set")
        elif isinstance(value, list):
            items = ", ".join('"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"' for item in value)
            lines.append(f"{key} = [{items}]")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
    return "\n".join(lines) + "\n"
