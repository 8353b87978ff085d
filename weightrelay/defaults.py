"""The training settings' defaults and limits, stated once for the worker and the coordinator.

A Train request's 0 means the default (proto3 cannot tell 0 from unset); the coordinator fills the
same defaults into its run settings and checks its settings against the same limits, so a run that
no worker would take is refused before anything starts.
"""

from __future__ import annotations

import math

EPOCHS = 1
BATCH_SIZE = 64
LEARNING_RATE = 0.01
#: The coordinator's default SGD momentum. On the wire 0 is a real momentum (plain SGD), not "unset".
MOMENTUM = 0.5
#: Evaluate's batch when the request names none.
EVAL_BATCH = 1000

MAX_EPOCHS = 1000
MAX_LEARNING_RATE = 100.0
#: Seeds are uint64 on the wire; 0 is a real seed.
MAX_SEED = 2**64 - 1


def epochs_problem(epochs: int) -> str | None:
    """Why `epochs` (0 meaning the default) is no setting a worker takes, or None."""
    if epochs > MAX_EPOCHS:
        return f"epochs {epochs} is more than {MAX_EPOCHS}"
    if epochs < 0:
        return f"epochs must be at least 1, got {epochs}"
    return None


def learning_rate_problem(learning_rate: float) -> str | None:
    """Why `learning_rate` (0 meaning the default) is no setting a worker takes, or None."""
    if not math.isfinite(learning_rate) or not 0 <= learning_rate <= MAX_LEARNING_RATE:
        return f"learning_rate must be a number in (0, {MAX_LEARNING_RATE:g}] (0 means {LEARNING_RATE:g}), got {learning_rate}"
    return None


def momentum_problem(momentum: float) -> str | None:
    """Why `momentum` is no setting a worker takes, or None."""
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        return f"momentum must be in [0, 1), got {momentum}"
    return None


def seed_problem(seed: int) -> str | None:
    """Why `seed` is no seed a worker takes (a uint64), or None."""
    if not 0 <= seed <= MAX_SEED:
        return f"seed must be in [0, 2**64 - 1], got {seed}"
    return None
