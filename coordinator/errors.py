"""Coordinator failures, each with its own exit code (documented in the README)."""

from __future__ import annotations


class CoordinatorError(Exception):
    exit_code = 1


class UsageError(CoordinatorError):
    exit_code = 2


class SettingsRefused(UsageError):
    """A worker refused the run's settings (INVALID_ARGUMENT): running again as it is can only fail again."""


class WorkerUnreachable(CoordinatorError):
    exit_code = 3

    def __init__(self, name: str, address: str, detail: str = ""):
        tail = f" ({detail})" if detail else ""
        super().__init__(f"{name} worker unreachable at {address}: is it running?{tail}")


class WorkerLeased(CoordinatorError):
    """A worker is leased to another run (worker.proto, Leases): this run cannot use it now."""

    exit_code = 3


class IncompatibleWorkers(CoordinatorError):
    exit_code = 4


class RoundFailed(CoordinatorError):
    exit_code = 5


class WorkerStartFailed(CoordinatorError):
    """A --local worker exited before serving (its own error line leads the message)."""

    exit_code = 6
