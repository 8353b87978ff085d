"""Who may use a worker's model now: admission of model calls, the model itself, training, and the lease.

Every model RPC goes through one ModelGate: it is admitted (at most `max_calls` model calls run or
wait at once, so they never take the threads that health checks and Describe need), then holds the
model (one model operation at a time). A Train holds the model for its whole run; other calls
meanwhile are refused at once (FAILED_PRECONDITION, reason WORKER_TRAINING) instead of waiting.
A call that changes the model holds it only when the worker's lease (leases.py) lets it: the check
and the change happen under the same hold, so no other run's grant can come between them.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import grpc

from weightrelay.errors import WORKER_TRAINING, Refused
from weightrelay.leases import Leases

#: Model calls (Initialize, Train, Evaluate, GetWeights, SetWeights, PullWeights) running or waiting
#: for the model at once; more get RESOURCE_EXHAUSTED at once.
MAX_MODEL_CALLS = 8
#: While a call waits for the model, how often it looks whether a Train took the model or the
#: caller left.
_POLL_SECONDS = 0.05


class ModelGate:
    """Admission, the model's lock and the training flag of one worker.

    `on_wait` is called while a call waits for the model held by another: the weight store uses it
    to let a GetWeights that reads the model's memory go on from a copy (store.DirectRead), so a slow
    reader never keeps the model from others."""

    def __init__(self, max_calls: int = MAX_MODEL_CALLS):
        self.max_calls = max_calls
        self._admission = threading.BoundedSemaphore(max_calls)
        self._lock = threading.Lock()
        self.training = False
        self.leases = Leases()
        self.on_wait: Callable[[], None] = lambda: None

    # -- admission ----------------------------------------------------------------------------------
    def admit(self, method: str) -> None:
        """Count a model call in, or refuse it when `max_calls` are in already. Pair with leave()."""
        if not self._admission.acquire(blocking=False):
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{method}: the worker already has {self.max_calls} model calls running or waiting; call again later")

    def leave(self) -> None:
        self._admission.release()

    @contextmanager
    def admitted(self, method: str) -> Iterator[None]:
        self.admit(method)
        try:
            yield
        finally:
            self.leave()

    # -- the model ----------------------------------------------------------------------------------
    def refuse_while_training(self, what: str = "call again when its Train stream has ended") -> None:
        if self.training:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"the worker is training; {what}", WORKER_TRAINING)

    def check_lease(self, context: grpc.ServicerContext, method: str, taking: bool = False) -> None:
        """Refuse `method`, a call that would change the worker, unless the lease lets the caller (early,
        before a call does work; `hold(context, method)` checks again under the hold)."""
        self.leases.check(context, method, taking)

    def hold(self, context: grpc.ServicerContext, changes: str = "", taking: bool = False) -> None:
        """Take the model: wait while another short call holds it, refuse while a Train does, and give
        up when the caller has gone (cancelled, deadline passed). A call that `changes` the model (its
        method's name) must also be let by the lease (`taking` it: see Leases.check). Pair with let_go()."""
        while not self._lock.acquire(blocking=False):
            self.on_wait()
            if self._lock.acquire(timeout=_POLL_SECONDS):
                break
            self.refuse_while_training()
            if not context.is_active():
                raise Refused(grpc.StatusCode.CANCELLED, "the call ended while it waited for the model")
        if changes:
            try:
                self.leases.check(context, changes, taking)
            except BaseException:
                self._lock.release()
                raise

    def let_go(self) -> None:
        self._lock.release()

    @contextmanager
    def holding(self, context: grpc.ServicerContext, changes: str = "", taking: bool = False) -> Iterator[None]:
        self.hold(context, changes, taking)
        try:
            yield
        finally:
            self.let_go()

    @contextmanager
    def model_call(self, context: grpc.ServicerContext, method: str, changes: bool = False, taking: bool = False) -> Iterator[None]:
        """Admitted, and holding the model, for the block: a short model call (one that `changes` the
        model only if the lease lets the caller, or it is `taking` the lease)."""
        with self.admitted(method), self.holding(context, method if changes else "", taking):
            yield

    # -- training -----------------------------------------------------------------------------------
    def start_training(self, context: grpc.ServicerContext) -> None:
        """Admit a Train and hold the model for it; the Train ends with end_training() (from any thread)."""
        self.admit("Train")
        try:
            if self.training:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "the worker is training already; one Train at a time", WORKER_TRAINING)
            self.hold(context, "Train")
        except BaseException:
            self.leave()
            raise
        self.training = True

    def end_training(self) -> None:
        self.training = False
        self.let_go()
        self.leave()
