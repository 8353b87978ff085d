"""A worker's lease: one run at a time may change the worker (see worker.proto, Leases).

The lease id is the holder's capability: calls that change the worker carry it as metadata
`weightrelay-lease`; from anyone else they are refused (FAILED_PRECONDITION, reason LEASE_HELD, the
holder named), so an intrusion into a run never silently changes its result. A lease that is not
renewed for its duration expires, so a run whose coordinator vanished frees its workers by itself.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import grpc

from weightrelay.errors import Refused
from weightrelay.v1 import worker_pb2 as pb

log = logging.getLogger("weightrelay.service")

#: The call metadata that carries a lease id.
METADATA_KEY = "weightrelay-lease"
#: A lease's duration when the request names none.
DEFAULT_SECONDS = 180
#: The longest duration granted: a holder renews, it does not take a worker for days.
MAX_SECONDS = 24 * 3600
#: Longest run id and holder kept (they come from the wire and are shown to others).
MAX_TEXT = 256

LEASE_HELD = "LEASE_HELD"
LEASE_UNKNOWN = "LEASE_UNKNOWN"
LEASE_LOST = "LEASE_LOST"


def lease_id_of(context: grpc.ServicerContext) -> str:
    """The lease id a call carries ('' when none)."""
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""


def _utc(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Lease:
    lease_id: str
    run_id: str
    holder: str
    seconds: int
    expires: float        # on the worker's monotonic clock
    expires_unix: float   # the same moment, for people and other machines

    def to_proto(self, with_id: bool = False) -> pb.Lease:
        return pb.Lease(lease_id=self.lease_id if with_id else "", run_id=self.run_id, holder=self.holder,
                        seconds=self.seconds, expires_unix=self.expires_unix)

    def who(self) -> str:
        return f"run {self.run_id!r} ({self.holder})" if self.holder else f"run {self.run_id!r}"


def _duration(seconds: int) -> int:
    return min(seconds or DEFAULT_SECONDS, MAX_SECONDS)


class Leases:
    """The worker's lease, if any. Thread-safe; `clock` and `wall` are the monotonic and the epoch clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self._clock, self._wall = clock, wall
        self._lease: Lease | None = None
        self._lock = threading.Lock()

    def current(self) -> Lease | None:
        """The lease in force: None when there is none or it expired."""
        with self._lock:
            return self._current()

    def _current(self) -> Lease | None:
        lease = self._lease
        if lease is not None and self._clock() >= lease.expires:
            log.warning("the lease of %s expired without renewal; the worker is free", lease.who())
            self._lease = lease = None
        return lease

    def _refusal(self, lease: Lease, what: str) -> Refused:
        return Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{what}: the worker is leased to {lease.who()} until {_utc(lease.expires_unix)}; wait for that run to end, "
            f"use other workers, or break a stale lease with `coordinator release ADDRESS`",
            LEASE_HELD, {"run_id": lease.run_id, "holder": lease.holder, "expires_unix": f"{lease.expires_unix:.0f}"})

    def check(self, context: grpc.ServicerContext, what: str, taking: bool = False) -> None:
        """Refuse a call that would change the worker unless the call carries the lease's id, or the worker
        is free and the call carries no id (a client that knows nothing of leases). A call that carries the
        id of a lease no longer held is refused too (LEASE_LOST), since anyone may have changed the worker
        since, except where it is `taking` the lease again (Initialize with a lease: a resumed run)."""
        carried = lease_id_of(context)
        with self._lock:
            lease = self._current()
        if lease is not None and carried != lease.lease_id:
            raise self._refusal(lease, what)
        if lease is None and carried and not taking:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{what}: the lease this call carries is no longer held (it expired or was broken), so the worker "
                          f"may have changed since; take the worker again (Initialize with a lease, or `coordinator run --resume`)",
                          LEASE_LOST)

    @staticmethod
    def validate(request: pb.LeaseRequest) -> None:
        """Refuse a lease request that names no run, or too much text (INVALID_ARGUMENT)."""
        if not request.run_id:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "lease: run_id is empty; name the run that takes the worker")
        if len(request.run_id) > MAX_TEXT or len(request.holder) > MAX_TEXT:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"lease: run_id and holder are at most {MAX_TEXT} characters")

    def grant(self, context: grpc.ServicerContext, request: pb.LeaseRequest) -> Lease:
        """The lease for `request`: the current one renewed when the call carries its id (the same run
        taking it back), else a new one where the worker is free. Call while holding the model, so that
        no other grant comes between the caller's check and this."""
        self.validate(request)
        with self._lock:
            lease = self._current()
            if lease is not None and lease_id_of(context) != lease.lease_id:
                raise self._refusal(lease, "Initialize")
            seconds = _duration(request.seconds)
            lease_id = lease.lease_id if lease is not None else secrets.token_hex(16)
            self._lease = Lease(lease_id, request.run_id, request.holder, seconds, self._clock() + seconds, self._wall() + seconds)
            log.info("leased to %s for %d s", self._lease.who(), seconds)
            return self._lease

    def renew(self, lease_id: str, seconds: int = 0) -> Lease:
        """Extend the lease `lease_id` by its duration (or `seconds`) from now."""
        with self._lock:
            lease = self._current()
            if lease is None or not lease_id or lease_id != lease.lease_id:
                raise Refused(grpc.StatusCode.NOT_FOUND, "RenewLease: the worker holds no lease of that id (it expired, was "
                              "released or broken); take the worker again with Initialize", LEASE_UNKNOWN)
            seconds = _duration(seconds or lease.seconds)
            self._lease = replace(lease, seconds=seconds, expires=self._clock() + seconds, expires_unix=self._wall() + seconds)
            return self._lease

    def release(self, lease_id: str, force: bool = False) -> Lease | None:
        """End the lease `lease_id` (any lease with `force`); the lease that ended, None when none was held."""
        if not lease_id and not force:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "ReleaseLease: name the lease_id, or set force to break whatever lease is held")
        with self._lock:
            lease = self._current()
            if lease is None:
                if force:
                    return None
                raise Refused(grpc.StatusCode.NOT_FOUND, "ReleaseLease: the worker holds no lease of that id (it expired, "
                              "was released or broken)", LEASE_UNKNOWN)
            if not force and lease_id != lease.lease_id:
                raise Refused(grpc.StatusCode.NOT_FOUND, "ReleaseLease: the worker holds no lease of that id; an operator "
                              "breaks another run's lease with force", LEASE_UNKNOWN)
            self._lease = None
            log.warning("lease of %s %s", lease.who(), "broken" if force and lease_id != lease.lease_id else "released")
            return lease
