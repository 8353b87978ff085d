"""Label objectives: which label a worker is taught for each true label.

An objective is a permutation of the data set's classes, applied to training labels only;
evaluation always scores against the true labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_CLASSES = 10  # the default: the MNIST family and CIFAR-10

_HELP = 'use "identity", "swap:A,B" (two labels) or "perm:p0,...,pN-1" (a permutation of the labels)'


@dataclass(frozen=True)
class Objective:
    """A permutation of the class labels; `mapping[i]` is the label trained for true label i."""

    mapping: tuple[int, ...]

    @property
    def name(self) -> str:
        """Canonical spelling: "identity", "swap:A,B" with A < B, else "perm:..."."""
        moved = [i for i, p in enumerate(self.mapping) if p != i]
        if not moved:
            return "identity"
        if len(moved) == 2:
            a, b = moved
            return f"swap:{a},{b}"
        return "perm:" + ",".join(str(p) for p in self.mapping)

    def apply(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(self.mapping, dtype=labels.dtype)[labels]

    def __str__(self) -> str:
        return self.name


def _label(text: str, spec: str, num_classes: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"objective {spec!r}: {text.strip()!r} is not a label; {_HELP}") from None
    if not 0 <= value < num_classes:
        raise ValueError(f"objective {spec!r}: label {value} is out of range 0-{num_classes - 1}")
    return value


def parse_objective(spec: str, num_classes: int = NUM_CLASSES) -> Objective:
    """Parse "identity", "swap:A,B" or "perm:p0,...,pN-1" over `num_classes` labels; raise ValueError naming the fix."""
    text = spec.strip().lower()
    if text in ("identity", "id", "none"):
        return Objective(tuple(range(num_classes)))
    kind, sep, args = text.partition(":")
    if not sep:
        raise ValueError(f"unknown objective {spec!r}; {_HELP}")
    parts = args.split(",")
    if kind == "swap":
        if len(parts) != 2:
            raise ValueError(f"objective {spec!r}: swap takes exactly two labels, e.g. swap:1,7")
        a, b = (_label(p, spec, num_classes) for p in parts)
        if a == b:
            raise ValueError(f"objective {spec!r}: swap needs two different labels")
        mapping = list(range(num_classes))
        mapping[a], mapping[b] = b, a
        return Objective(tuple(mapping))
    if kind in ("perm", "permutation"):
        mapping = [_label(p, spec, num_classes) for p in parts]
        if len(mapping) != num_classes or sorted(mapping) != list(range(num_classes)):
            raise ValueError(f"objective {spec!r}: perm needs each of the labels 0-{num_classes - 1} exactly once")
        return Objective(tuple(mapping))
    raise ValueError(f"unknown objective kind {kind!r} in {spec!r}; {_HELP}")
