"""A run's leases on its workers (worker.proto, Leases): taken at Initialize, renewed while the run
lives, released when it ends, and kept in the run directory so that `--resume` takes them back.

Renewals run on a thread of their own, every third of the lease's duration, so a run blocked in a
long Train never loses its workers; a coordinator that vanishes (killed, its machine lost) renews
nothing, and its workers are free again once the duration has passed.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import threading
from pathlib import Path

import grpc

from weightrelay import errors, leases
from weightrelay.client import WorkerClient
from weightrelay.files import write_json_atomic
from weightrelay.v1 import worker_pb2 as pb

log = logging.getLogger("coordinator")

#: The run directory's record of its lease ids (the holder's capability: readable by its owner only).
LEASES_FILE = "leases.json"


def holder(run_dir: Path) -> str:
    """Who holds a run's workers, for people: user, host and run directory."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} {run_dir.resolve()}"


def saved_lease_ids(run_dir: Path) -> dict[str, str]:
    """{worker name: lease id} a run kept (empty when it kept none)."""
    try:
        saved = json.loads((run_dir / LEASES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}


class LeaseKeeper:
    """The leases of one run's workers: `request()` is what each Initialize asks for; `took()` records
    a granted lease; `start()` begins the renewals; `release()` ends them and the leases."""

    def __init__(self, run_dir: Path, seconds: int):
        self.run_dir = run_dir
        self.seconds = seconds
        self._clients: dict[str, WorkerClient] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: dict[str, str] = {}  # worker name: why its lease could not be renewed

    def request(self) -> pb.LeaseRequest:
        return pb.LeaseRequest(run_id=self.run_dir.name, holder=holder(self.run_dir), seconds=self.seconds)

    def resume(self, clients: dict[str, WorkerClient]) -> None:
        """Present the lease ids the run kept (a resumed run takes its leases back at once)."""
        saved = saved_lease_ids(self.run_dir)
        for name, client in clients.items():
            client.lease_id = saved.get(name, "")

    def took(self, name: str, client: WorkerClient) -> None:
        """`client` holds `name`'s lease now: renew it, and keep its id in the run directory."""
        self._clients[name] = client
        write_json_atomic(self.run_dir / LEASES_FILE, {n: c.lease_id for n, c in self._clients.items()}, private=True)

    def start(self) -> None:
        if self._thread is None and self._clients:
            self._thread = threading.Thread(target=self._renew, name="leases", daemon=True)
            self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            for name, client in list(self._clients.items()):
                if name in self.lost:
                    continue
                try:
                    client.renew_lease(timeout=max(1.0, self.seconds / 3))
                except grpc.RpcError as exc:
                    if errors.reason_of(exc) == leases.LEASE_UNKNOWN:  # expired or broken: the run's next change is refused
                        self.lost[name] = exc.details() or ""
                        log.warning("the lease on the %s worker is lost: %s", name, exc.details())
                    # else (unreachable for a moment): the next renewal tries again, within the lease's duration

    def release(self) -> None:
        """Stop renewing and end every lease this run holds (a worker that cannot be reached lets its
        lease expire by itself)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for name, client in self._clients.items():
            if not client.lease_id:
                continue
            try:
                client.release_lease(timeout=5)
            except grpc.RpcError as exc:
                log.info("the %s worker's lease was not released (%s); it expires by itself", name, exc.code().name)
