"""Checks of one setting's value, shared by the flags and the config file: each returns the value
in its canonical form or raises ValueError saying what is wrong and how to fix it.

The training settings are held to the limits a worker holds them to (`weightrelay.defaults`), so
a value no worker would take is refused while the command line or the file is read, naming the
flag or the key, before anything starts.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from weightrelay import defaults, leases, models
from weightrelay.objectives import parse_objective

_WORKER_NAME = re.compile(r"^[a-z][a-z0-9_]*(-[a-z0-9_]+)*$")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def positive_int(value: Any) -> int:
    number_ = _int(value)
    if number_ < 1:
        raise ValueError(f"{value} must be at least 1")
    return number_


def non_negative_int(value: Any) -> int:
    number_ = _int(value)
    if number_ < 0:
        raise ValueError(f"{value} must be 0 or more")
    return number_


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


def _within(check: Callable[[Any], str | None], value: Any) -> Any:
    problem = check(value)
    if problem:
        raise ValueError(problem)
    return value


def epochs(value: Any) -> int:
    """At least 1 (a worker reads 0 as its default) and at most `defaults.MAX_EPOCHS`."""
    return _within(defaults.epochs_problem, positive_int(value))


def learning_rate(value: Any) -> float:
    """More than 0 (a worker reads 0 as its default) and at most `defaults.MAX_LEARNING_RATE`."""
    return _within(defaults.learning_rate_problem, positive_number(value))


def momentum(value: Any) -> float:
    return _within(defaults.momentum_problem, unit_interval(value))


def lease_seconds(value: Any) -> int:
    """A lease's duration a worker grants: at least 3 s (renewed every third of it), at most a day."""
    seconds = positive_int(value)
    if not 3 <= seconds <= leases.MAX_SECONDS:
        raise ValueError(f"{value} must be in [3, {leases.MAX_SECONDS}] seconds")
    return seconds


def seed(value: Any) -> int:
    """A uint64, as on the wire (each round's Train seed, derived from it, is checked with the rounds)."""
    return _within(defaults.seed_problem, non_negative_int(value))


def address(value: Any) -> str:
    text_value = str(value)
    host, sep, port = text_value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text_value!r} is not HOST:PORT")
    return text_value


def _labels_needed(spec: str) -> int:
    """The fewest classes `spec` can be read over: a perm names every label; a swap needs its larger one."""
    kind, _, args = spec.strip().lower().partition(":")
    if kind in ("perm", "permutation"):
        return len(args.split(","))
    labels = [int(part) for part in args.split(",") if part.strip().isdigit()]
    return max(labels, default=1) + 1


def objective(value: Any) -> str:
    """An objective's canonical spelling. Its labels are checked against the data set's classes
    once the data set is known (`coordinator.checks`): here only its form is."""
    text_value = str(value)
    return parse_objective(text_value, _labels_needed(text_value)).name


def model(value: Any) -> str:
    """A built-in model name or a model TOML file (read and checked now; its fit to the data set
    is checked once the data set is known)."""
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


def split_named(entry: str) -> tuple[str, str]:
    """("NAME", "VALUE") of a checked NAME=VALUE entry."""
    name, _, rest = entry.partition("=")
    return name, rest
