"""The settings of one relay run: defaults, a TOML file, then flags, in that order of precedence.

The resolved settings are saved in the run directory as `config.toml`, which `coordinator run
--config` takes back, so any run can be repeated exactly.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from coordinator.errors import UsageError
from weightrelay import models
from weightrelay.data import DEFAULT_DATASET
from weightrelay.objectives import parse_objective


#: Where the workers are when neither the file nor a flag says: these variables, else loopback.
#: (The compose file points them at the worker containers.)
TORCH_ADDRESS_ENV, KERAS_ADDRESS_ENV = "WEIGHTRELAY_TORCH_ADDRESS", "WEIGHTRELAY_KERAS_ADDRESS"


_WORKER_NAME = re.compile(r"^[a-z][a-z0-9_]*(-[a-z0-9_]+)*$")


@dataclass
class RunConfig:
    rounds: int = 20
    torch: str = field(default_factory=lambda: os.environ.get(TORCH_ADDRESS_ENV) or "127.0.0.1:50051")
    keras: str = field(default_factory=lambda: os.environ.get(KERAS_ADDRESS_ENV) or "127.0.0.1:50052")
    local: bool = False
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.5
    seed: int = 0
    model: str = models.DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    torch_objective: str = "swap:1,7"
    keras_objective: str = "identity"
    data_dir: str | None = None
    out: str = "runs"
    max_train_samples: int = 0
    connect_timeout: float = 15.0
    call_timeout: float = 300.0     # deadline of each Describe, Initialize, Evaluate, GetWeights and SetWeights
    train_timeout: float = 1800.0   # per epoch: a Train's deadline is epochs x this
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token_file: str | None = None   # the path only: the token itself is never written to the run directory
    worker: list[str] = field(default_factory=list)      # NAME=HOST:PORT, any number (then --torch/--keras are not used)
    workers: str = ""                                    # --local: the workers to start, e.g. "torch,keras,jax"
    order: str = ""                                      # the relay ring, e.g. "jax,torch,keras" (default: as given)
    objective: list[str] = field(default_factory=list)   # NAME=OBJECTIVE, per worker
    via_coordinator: bool = False                        # move weights through the coordinator, not worker to worker
    every_steps: int = 0                                 # twin: also measure every K steps
    twin_objective: str = "identity"                     # twin: the objective every worker trains

    def addresses(self) -> dict[str, str]:
        """{name: HOST:PORT} of the workers to connect to (not --local), in the order given."""
        if self.worker:
            return dict(entry.split("=", 1) for entry in self.worker)
        return {"torch": self.torch, "keras": self.keras}

    def local_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.workers.split(",") if n.strip()) or ("torch", "keras")

    def ring(self, names: list[str]) -> list[str]:
        """The relay ring over the workers: --order, else the order they were given in."""
        if not self.order:
            return list(names)
        ring = [n.strip() for n in self.order.split(",") if n.strip()]
        if sorted(ring) != sorted(names):
            raise UsageError(f"--order {self.order}: name each worker once ({', '.join(names)})")
        return ring

    def objective_for(self, name: str) -> str:
        """--objective NAME=OBJ; else torch's --torch-objective and keras' --keras-objective; else identity."""
        given = dict(entry.split("=", 1) for entry in self.objective)
        if name in given:
            return given[name]
        return {"torch": self.torch_objective, "keras": self.keras_objective}.get(name, "identity")

    def train_deadline(self) -> float:
        return self.epochs * self.train_timeout

    def train_seed(self, round_index: int) -> int:
        """Each round shuffles differently, reproducibly from --seed."""
        return self.seed * 100_003 + round_index

    def to_dict(self) -> dict:
        return asdict(self)


# -- validation shared by flags and the config file (each raises ValueError with the fix) -----
def positive_int(value: Any) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError(f"{value} must be at least 1")
    return number


def non_negative_int(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError(f"{value} must be 0 or more")
    return number


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None


def unit_interval(value: Any) -> float:
    result = number(value)
    if not 0 <= result < 1:
        raise ValueError(f"{value} must be in [0, 1)")
    return result


def positive_number(value: Any) -> float:
    result = number(value)
    if not result > 0:
        raise ValueError(f"{value} must be more than 0")
    return result


def address(value: Any) -> str:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return text


def objective(value: Any) -> str:
    """Checked for up to 10 classes here; the workers check it against their data set."""
    return parse_objective(str(value)).name


def model(value: Any) -> str:
    """A built-in model name or a model TOML file (read and checked now)."""
    text_value = str(value)
    try:
        models.load_model(text_value)
    except models.SpecError as exc:
        raise ValueError(str(exc)) from None
    return text_value


def worker_name(value: Any) -> str:
    text_value = str(value).strip()
    if not _WORKER_NAME.match(text_value):
        raise ValueError(f"{text_value!r} is not a worker name (lower-case letters, digits, _ and -, e.g. torch-b)")
    return text_value


def named_address(value: Any) -> str:
    """NAME=HOST:PORT."""
    name, sep, rest = str(value).partition("=")
    if not sep:
        raise ValueError(f"{value!r} is not NAME=HOST:PORT (e.g. jax=127.0.0.1:50053)")
    return f"{worker_name(name)}={address(rest)}"


def named_objective(value: Any) -> str:
    """NAME=OBJECTIVE."""
    name, sep, rest = str(value).partition("=")
    if not sep:
        raise ValueError(f"{value!r} is not NAME=OBJECTIVE (e.g. jax=swap:3,8)")
    return f"{worker_name(name)}={objective(rest)}"


def name_list(value: Any) -> str:
    """Comma-separated worker names, each once."""
    names = [worker_name(n) for n in str(value).split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{value!r}: give worker names separated by commas, each once (e.g. torch,keras,jax)")
    return ",".join(names)


def list_of(item: Callable[[Any], str]) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        if not isinstance(value, list):
            raise ValueError(f"{value!r} is not a list")
        return [item(v) for v in value]

    check.__name__ = f"list_of_{item.__name__}"
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "rounds": positive_int,
    "torch": address,
    "keras": address,
    "local": boolean,
    "epochs": positive_int,
    "batch_size": positive_int,
    "lr": positive_number,
    "momentum": unit_interval,
    "seed": non_negative_int,
    "model": model,
    "dataset": text,
    "torch_objective": objective,
    "keras_objective": objective,
    "data_dir": text,
    "out": text,
    "max_train_samples": non_negative_int,
    "connect_timeout": positive_number,
    "call_timeout": positive_number,
    "train_timeout": positive_number,
    "tls_ca": text,
    "tls_cert": text,
    "tls_key": text,
    "tls_server_name": text,
    "token_file": text,
    "worker": list_of(named_address),
    "workers": name_list,
    "order": name_list,
    "objective": list_of(named_objective),
    "via_coordinator": boolean,
    "every_steps": non_negative_int,
    "twin_objective": objective,
}
#: How a repeatable flag checks each of its values (the config file gives the whole list).
ITEM_VALIDATORS: dict[str, Callable[[Any], Any]] = {"worker": named_address, "objective": named_objective}
assert set(VALIDATORS) == {f.name for f in fields(RunConfig)}


def load_config_file(path: Path | str) -> dict[str, Any]:
    """Validated settings from a TOML file: top-level keys, or a [run] table, named like the
    flags (`batch_size` or `batch-size`)."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    table = document.get("run", document)
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in VALIDATORS:
            raise UsageError(f"config file {path}: unknown key {raw_key!r}; known keys: {', '.join(VALIDATORS)}")
        try:
            values[key] = VALIDATORS[key](value)
        except ValueError as exc:
            raise UsageError(f"config file {path}: key {raw_key}: {exc}") from None
    return values


def resolve(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RunConfig:
    """Defaults, overridden by the file, overridden by the flags given on the command line."""
    return RunConfig(**{**file_values, **flag_values})


def to_toml(config: RunConfig) -> str:
    """The settings as a TOML file that `coordinator run --config` reads back."""
    lines = ["# Resolved settings of this run; repeat it with: coordinator run --config config.toml", "[run]"]
    for key, value in config.to_dict().items():
        if value is None or value == [] or value == "":
            lines.append(f"# {key} is not set")
        elif isinstance(value, list):
            items = ", ".join('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for v in value)
            lines.append(f"{key} = [{items}]")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
    return "\n".join(lines) + "\n"
