"""Large matrices received straight into a framework's layout, band by band, while their set arrives.

A channels-last framework (Keras, JAX) holds a dense kernel as [in, out], and so does PyTorch on the CPU for
a large one (seen as [out, in]: torch_service.adapter); the wire carries it as [out, in]. Received into the
canonical layout first and transposed once the set is whole, such a kernel costs a second copy of itself in
memory (the received set beside the converted one beside the model) and its transpose's full time after the
transfer. A `BandConversion` instead takes a target matrix's bytes from the stream itself
(codec.receive_weights asks it for a `sink` per tensor): the pieces fill a small band buffer of whole rows,
and as soon as a band is full a thread of its own transposes it into the matching columns of the
framework-layout array, beside the rest of the transfer. The received set then shows that matrix as a
transposed view of the converted array, so the receiver's checks (checksum of the bytes as they came,
shapes, finite values) read exactly what the framework takes. A matrix the sender sends transposed (held
[in, out] there too: Tensor.transposed) needs no transpose at all: its bytes go straight into the
framework-layout array, each piece scanned for NaN and Inf as it is copied (`_HeldSink`). That copy stays on
the receiving thread: handed to the conversion's thread instead, the pieces' copies and the receive took
turns on Python's lock, and moves got slower (bench/README.md).

Nothing of this reaches the model before the set passes every check: `converted(weights)` hands over
the arrays only for matrices whose sinks the verified set holds. A set refused or abandoned is
`cancel`led and its arrays dropped. numpy only.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Mapping

import numpy as np

from weightrelay.buffers import aligned_empty, recycled_memory, same_view
from weightrelay.codec import TensorSpec, all_finite, storage_dtype, wire
from weightrelay.transpose import transpose_into

#: Bytes of whole rows a band buffer holds (at least one row): a band is transposed in one go; the sender's
#: band size (codec.wire.BAND_BYTES, which says why).
BAND_BYTES = wire.BAND_BYTES
#: Band buffers of one receive: one filling while the others wait for, or are in, the transposing thread.
BANDS = 3


class _FiniteScan:
    """A sink's own NaN/Inf scan of its matrix as the values pass (float32 and float64 only: those are scanned),
    part by part while they are in the caches; `checked_finite` once every value was found finite. After a part
    with NaN or Inf it scans no more: the receive's own scan then names the value's place."""

    def __init__(self, dtype: np.dtype, size: int) -> None:
        self._scanning = dtype in (np.float32, np.float64)
        self._size = size
        self.checked = 0  # values found finite

    def add(self, values: np.ndarray) -> None:
        """Scan the next values of the matrix (those after the `checked` ones)."""
        if self._scanning:
            if all_finite(values):  # without a mask of the whole part
                self.checked += values.size
            else:
                self._scanning = False

    @property
    def checked_finite(self) -> bool:
        return self._scanning and self.checked == self._size


class _BandSink:
    """One target matrix of a receive: its bytes in arrival order into band buffers, each full band
    transposed into `out` (the framework's [in, out] array); `array` is `out` seen as received ([out, in])."""

    def __init__(self, conversion: BandConversion, shape: tuple[int, int], dtype: np.dtype, allocate) -> None:
        self._conversion = conversion
        self.out = allocate(shape[::-1], dtype)
        self.array = self.out.T
        self._rows = shape[0]
        self._row_bytes = shape[1] * dtype.itemsize
        self._band_rows = max(1, BAND_BYTES // self._row_bytes)
        self._dtype = dtype
        self._band: np.ndarray | None = None  # the band buffer being filled (flat bytes)
        self._filled = 0  # bytes in it
        self._row = 0  # the matrix row it starts at: the rows before it are handed to the thread
        self._scan = _FiniteScan(dtype, shape[0] * shape[1])  # on the thread, band by band

    @property
    def checked_finite(self) -> bool:
        """Every row of the matrix was found finite as its band was transposed (TensorSink): the receive's
        own scan, which names a non-finite value's place, is then not needed."""
        return self._scan.checked_finite

    def _transpose(self, band: np.ndarray, start: int, stop: int) -> None:
        """On the conversion's thread: one band into the columns start:stop of `out`, and scanned for NaN and
        Inf there, beside the rest of the transfer, while it is in the caches."""
        transpose_into(band, self.out[:, start:stop], threads=1)  # beside the receive: one thread is enough
        self._scan.add(band)

    def _band_size(self) -> int:
        return min(self._band_rows, self._rows - self._row) * self._row_bytes

    def write(self, data: bytes | memoryview) -> None:
        """The matrix's next bytes, in order (the codec checks offsets and sizes before)."""
        data = memoryview(data).cast("B")
        position = 0
        while position < len(data):
            if self._band is None:
                self._band = self._conversion._take_buffer(self._band_rows * self._row_bytes)
            size = self._band_size()
            count = min(size - self._filled, len(data) - position)
            memoryview(self._band)[self._filled : self._filled + count] = data[position : position + count]
            self._filled += count
            position += count
            if self._filled == size:
                rows = size // self._row_bytes
                band = self._band[:size].view(self._dtype).reshape(rows, -1)
                self._conversion._submit(self, self._band, band, self._row, self._row + rows)
                self._band, self._filled = None, 0
                self._row += rows

    @property
    def whole(self) -> bool:
        return self._row == self._rows

    def complete(self) -> None:
        """Return once every band written is in `out` (raises what a band's transpose raised)."""
        self._conversion._wait()


class _HeldSink:
    """One target matrix sent transposed, as the framework holds it ([in, out]): its bytes in order straight into
    `out`; `array` is `out` seen as the canonical [out, in] tensor. Each piece is scanned for NaN and Inf as it is
    copied, while it is in the caches, instead of the whole matrix once more after the transfer."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, allocate) -> None:
        self.out = allocate(shape[::-1], dtype)
        self.array = self.out.T
        self._flat = self.out.reshape(-1)
        self._bytes = memoryview(self._flat).cast("B")
        self._itemsize = dtype.itemsize
        self._filled = 0
        self._scan = _FiniteScan(dtype, self._flat.size)

    @property
    def checked_finite(self) -> bool:
        """Every value was found finite as its piece was copied (TensorSink): the receive's own scan, which names
        a non-finite value's place, is then not needed."""
        return self._scan.checked_finite

    @property
    def whole(self) -> bool:
        return self._filled == len(self._bytes)

    def write(self, data: bytes | memoryview) -> None:
        """The transpose's next bytes, in order (the codec checks offsets and sizes before); the values they
        complete scanned for NaN and Inf (a piece may end inside a value)."""
        stop = self._filled + len(data)
        self._bytes[self._filled : stop] = data
        self._filled = stop
        self._scan.add(self._flat[self._scan.checked : stop // self._itemsize])

    def complete(self) -> None:
        """Nothing to wait for: every byte is in `out` as it is written."""


class BandConversion:
    """Receives the named matrices ([out, in] on the wire) straight into [in, out] arrays, band by band (or
    as they come, where the sender sends them transposed).

    `targets` names the canonical tensors to convert; `allocate(shape, dtype)` gives the memory of a
    result (the framework takes it as its own; default: aligned memory a kernel the framework let go of had,
    buffers.recycled_memory, else fresh). Give `sink` to
    codec.receive_weights, then call `converted` or `cancel` once."""

    def __init__(self, targets: set[str], allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] = recycled_memory.empty) -> None:
        self.targets = frozenset(targets)
        self._allocate = allocate
        self._sinks: dict[str, _BandSink | _HeldSink] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._free: list[np.ndarray] = []  # band buffers the thread is done with
        self._slots = threading.Semaphore(BANDS)
        self._pending = 0  # bands submitted and not yet transposed
        self._idle = threading.Condition()
        self._failed: BaseException | None = None
        self._cancelled = False

    def sink(self, spec: TensorSpec, transposed: bool = False) -> _BandSink | _HeldSink | None:
        """Where the receive writes tensor `spec`: for a non-empty target matrix a band sink, or sent `transposed`
        a sink that keeps its bytes as they come; else None (the codec's own array; refused if sent transposed)."""
        if spec.name not in self.targets or len(spec.shape) != 2 or 0 in spec.shape:
            return None
        dtype = np.dtype(storage_dtype(spec.dtype))
        sink = _HeldSink(spec.shape, dtype, self._allocate) if transposed else _BandSink(self, spec.shape, dtype, self._allocate)
        self._sinks[spec.name] = sink
        return sink

    # -- the band buffers and the thread ------------------------------------------------------------
    def _take_buffer(self, nbytes: int) -> np.ndarray:
        self._slots.acquire()  # at most BANDS buffers at once: a receive faster than the thread waits for it
        with self._idle:
            while self._free:
                buffer = self._free.pop()
                if len(buffer) >= nbytes:
                    return buffer
        return aligned_empty((nbytes,), np.uint8)

    def _submit(self, sink: _BandSink, buffer: np.ndarray, band: np.ndarray, start: int, stop: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="band-conversion", daemon=True)
            self._thread.start()
        with self._idle:
            self._pending += 1
        self._jobs.put((sink, buffer, band, start, stop))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            sink, buffer, band, start, stop = job
            try:
                if not self._cancelled and self._failed is None:
                    sink._transpose(band, start, stop)
            except BaseException as exc:  # noqa: BLE001 - raised to the receive by complete()
                self._failed = exc
            finally:
                with self._idle:
                    self._free.append(buffer)
                    self._pending -= 1
                    self._idle.notify_all()
                self._slots.release()

    def _wait(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        if self._failed is not None:
            raise RuntimeError(f"converting a received matrix into the framework's layout failed: {self._failed}") from self._failed

    def _finish(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self._free.clear()

    # -- handing over -------------------------------------------------------------------------------
    def converted(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{name: the [in, out] array} of every target `weights` holds as its sink's whole matrix (none if a
        band failed or the receive was cancelled); waits for the bands still queued."""
        self._finish()
        if self._failed is not None or self._cancelled:
            return {}
        return {name: sink.out for name, sink in self._sinks.items()
                if name in weights and same_view(weights[name], sink.array) and sink.whole}

    def cancel(self) -> None:
        """The set was refused or abandoned: stop, and let the results go."""
        self._cancelled = True
        self._finish()
        self._sinks.clear()
