"""Large matrices transposed into a framework's layout while their set is still arriving.

A channels-last framework (JAX) holds a dense kernel as [in, out], the wire carries it as [out, in].
Transposed only after the whole set has arrived and been checked, the conversion adds its full time
to every move into that framework. A `BandConversion` instead follows the receive (codec.stream calls
`written` after each piece lands in the received set's memory): as soon as a band of whole rows of a
target matrix has arrived, a thread of its own transposes that band into the matching columns of the
framework-layout array, beside the rest of the transfer.

Nothing of this reaches the model before the set passes every check: the receiver still verifies the
whole set, then `converted(weights)` hands over the arrays (waiting for the last bands) only for
matrices converted from exactly those arrays, whose rows are final once written. A set refused or
abandoned is `cancel`led and its arrays dropped. numpy only.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Mapping

import numpy as np

from weightrelay.buffers import same_view
from weightrelay.transpose import transpose_into

#: Rows of a target converted in one go once they have all arrived: whole pages of each row of the
#: result (fewer, larger strided writes than one per piece).
BAND_ROWS = 1024


class _Target:
    """One matrix being converted: the received array it reads, the result it writes, the rows done."""

    __slots__ = ("source", "out", "queued")

    def __init__(self, source: np.ndarray, out: np.ndarray) -> None:
        self.source = source
        self.out = out
        self.queued = 0  # rows handed to the thread


class BandConversion:
    """Transposes the named matrices ([out, in] as received -> [in, out]) band by band as they arrive.

    `targets` names the canonical tensors to convert; `allocate(shape, dtype)` gives the memory of a
    result (the framework takes it as its own). Call `written` from the receiving thread, then
    `converted` or `cancel` once."""

    def __init__(self, targets: set[str], allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray]) -> None:
        self._names = set(targets)
        self._allocate = allocate
        self._targets: dict[str, _Target] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._cancelled = False

    def written(self, name: str, array: np.ndarray, filled: int) -> None:
        """`filled` bytes of tensor `name` (received into `array`) have arrived: queue the bands now whole."""
        if name not in self._names or array.ndim != 2 or array.size == 0:
            return
        target = self._targets.get(name)
        if target is None or target.source is not array:  # a tensor seen again in a disordered stream: start over
            target = self._targets[name] = _Target(array, self._allocate(array.shape[::-1], array.dtype))
        rows = filled // (array.shape[1] * array.itemsize)
        if rows - target.queued >= BAND_ROWS or (rows == array.shape[0] and rows > target.queued):
            self._submit(target, target.queued, rows)
            target.queued = rows

    def _submit(self, target: _Target, start: int, stop: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="band-conversion", daemon=True)
            self._thread.start()
        self._jobs.put((target, start, stop))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            target, start, stop = job
            if self._cancelled or self._failed is not None:
                continue
            try:
                transpose_into(target.source[start:stop], target.out[:, start:stop])
            except BaseException as exc:  # noqa: BLE001 - reported by converted(): those matrices are converted again
                self._failed = exc

    def _finish(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def converted(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{name: the [in, out] array} of every target converted whole from the very array `weights` holds
        under its name (none if a band failed); waits for the bands still queued."""
        self._finish()
        if self._failed is not None or self._cancelled:
            return {}
        return {name: t.out for name, t in self._targets.items()
                if name in weights and same_view(weights[name], t.source) and t.queued == t.source.shape[0]}

    def cancel(self) -> None:
        """The set was refused or abandoned: stop, and let the results go."""
        self._cancelled = True
        self._finish()
        self._targets.clear()
