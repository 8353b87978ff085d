"""A spare weight-set-sized buffer that a worker keeps between moves.

Touching memory for the first time costs a page fault per page, and on virtual machines that hand
freed pages back to their host that costs many times more than copying into pages already touched.
A large set moves through a worker once per send (a snapshot of the model) and once per receive
(the set as it arrives, checked before it is applied), so the worker keeps one buffer of the set's
size and reuses it: after its first move a worker holds about twice its set, and later moves never
allocate a set again. Initialize keeps the spare only when the new model's set has the same size. A
worker that receives its large kernels straight into the framework's layout (weightrelay.conversion)
keeps a spare only for the rest of its set; the full snapshot it needs now and then is given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
import threading
from pathlib import Path
from typing import Iterable

import numpy as np

from weightrelay.codec import TensorSpec, storage_dtype

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations up to this size come from the heap, where freed memory is reused (glibc's own ceiling).
HEAP_ALLOCATIONS_UP_TO = 32 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse instead of being handed back.
KEEP_FREE_BYTES = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc reuse the memory of freed stream messages instead of handing it back at once.

    A weights stream allocates and frees a few MiB per message (the bytes, the protobuf message,
    its serialization). With glibc's defaults such blocks are mmap'd or trimmed off the heap when
    freed, so every message would touch fresh pages and pay their page faults again; kept on the
    heap, each message reuses the memory of the one before. Called once at start by workers and
    the coordinator; False where the C library is not glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_ALLOCATIONS_UP_TO)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))


def release_freed_memory() -> bool:
    """Hand the C library's free memory back to the system (glibc's malloc_trim: the heap's free pages,
    also below its top); False where the C library is not glibc. keep_freed_memory keeps freed messages
    for the next move; once the moves are over, this lets them go (weightrelay.store.IdleTrim)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


#: Each array in an arena starts at a multiple of this many bytes (cache lines, SIMD loads).
ALIGNMENT = 64


def _status_bytes(pid: int | str, field: str) -> int:
    """A size line of /proc/PID/status (kB) in bytes; 0 where /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes(pid: int | str = "self") -> int:
    """A process's peak resident set, VmHWM (getrusage's ru_maxrss keeps a parent's peak across exec); 0 where
    /proc is missing. Writing 5 to /proc/PID/clear_refs resets it (bench.transfer, before each move)."""
    return _status_bytes(pid, "VmHWM")


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set now, VmRSS; 0 where /proc is missing."""
    return _status_bytes(pid, "VmRSS")


def arena_bytes(specs: Iterable[TensorSpec]) -> int:
    """Bytes an arena needs to hold one array of each spec."""
    return sum(-(-spec.nbytes // ALIGNMENT) * ALIGNMENT for spec in specs)


def same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays show the same memory the same way (same base, address, shape, strides and dtype):
    two views of one received set, say, made by different calls."""
    base_a = a.base if a.base is not None else a
    base_b = b.base if b.base is not None else b
    return base_a is base_b and a.__array_interface__ == b.__array_interface__


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of ALIGNMENT bytes (TensorFlow
    takes only such memory as a tensor's own, and XLA on the CPU shares only such memory, without a copy)."""
    dtype = np.dtype(dtype)
    return _aligned_in(np.empty(math.prod(shape) * dtype.itemsize + ALIGNMENT, dtype=np.uint8), shape, dtype)


def _aligned_in(raw: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array of `shape` in `raw` (flat bytes, ALIGNMENT more than it needs), starting at an aligned address."""
    nbytes = math.prod(shape) * dtype.itemsize
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class RecycledMemory:
    """Aligned arrays for tensors a framework takes as its own memory (weightrelay.conversion), made again in the
    memory of one it has let go.

    A Keras or JAX model keeps the very array a large kernel was received into; the next set's kernel needs as
    much again. Fresh memory costs a page fault per page (and on this project's machines the kernel's huge-page
    compaction now and then: a 1 GiB move into JAX took every other time nearly twice as long), so the memory
    of the kernel a set replaced is kept and reused for the next set of moves. An array's memory is reused only
    once nothing refers to it any more: every numpy view refers to the array that owns the memory (and a
    framework holding the memory holds such a view), so an owner only this list refers to is free. `release`
    (store.IdleTrim, once the moves are over) hands the free ones back."""

    def __init__(self) -> None:
        self._owners: list[np.ndarray] = []  # flat byte arrays: in use by someone, or free
        self._lock = threading.Lock()

    def _free(self, index: int) -> bool:
        return sys.getrefcount(self._owners[index]) == 2  # the list's reference and getrefcount's argument

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised aligned C-contiguous array (as aligned_empty), in free memory of exactly its size where there is."""
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize + ALIGNMENT
        with self._lock:  # the array is made before another caller can see its memory free
            for index in range(len(self._owners)):
                if len(self._owners[index]) == size and self._free(index):
                    return _aligned_in(self._owners[index], shape, dtype)
            self._owners.append(np.empty(size, dtype=np.uint8))
            return _aligned_in(self._owners[-1], shape, dtype)

    def release(self) -> int:
        """Let the free memory go; return how many bytes the arrays still in use hold."""
        with self._lock:
            self._owners = [self._owners[index] for index in range(len(self._owners)) if not self._free(index)]
            return sum(len(owner) for owner in self._owners)


#: The process's recycled memory for tensors received straight into a framework's layout.
recycled_memory = RecycledMemory()


class Arena:
    """One flat buffer handed out as arrays, front to back."""

    def __init__(self, nbytes: int):
        self.buffer = aligned_empty((nbytes,), np.uint8)
        self._used = 0
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return len(self.buffer)

    def reset(self) -> None:
        self._used = 0

    def array(self, spec: TensorSpec) -> np.ndarray:
        """A little-endian array of `spec`'s shape in the next free bytes; a fresh one when the arena is full."""
        storage = storage_dtype(spec.dtype)
        if self._used + spec.nbytes > self.nbytes:
            return np.empty(spec.shape, dtype=storage)
        begin = self._used
        self._used += -(-spec.nbytes // ALIGNMENT) * ALIGNMENT
        return self.buffer[begin : begin + spec.nbytes].view(storage).reshape(spec.shape)


class SpareBuffer:
    """At most one idle Arena, lent to one move at a time; a second move at the same time gets a fresh one."""

    def __init__(self) -> None:
        self._idle: Arena | None = None
        self._generation = 0
        self._size: int | None = None  # the most it keeps, once fitted
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Arena:
        with self._lock:
            arena, self._idle = self._idle, None
            generation = self._generation
        if arena is None or arena.nbytes < nbytes:
            arena = Arena(nbytes)
        arena.reset()
        arena.generation = generation
        return arena

    def give_back(self, arena: Arena) -> None:
        """Keep `arena` for the next move (the larger of two, when both come back; none larger than the fitted size,
        none lent before a `fit`)."""
        with self._lock:
            if (arena.generation == self._generation and (self._size is None or arena.nbytes <= self._size)
                    and (self._idle is None or self._idle.nbytes < arena.nbytes)):
                self._idle = arena

    def fit(self, nbytes: int) -> None:
        """A model of `nbytes` replaces the last one: keep the spare only if it is that size (then it is
        reused as it is); an arena lent now is dropped when it comes back, and so is any larger one later."""
        with self._lock:
            if self._idle is not None and self._idle.nbytes != nbytes:
                self._idle = None
            self._generation += 1
            self._size = nbytes
