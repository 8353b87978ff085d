"""Transposes of large matrices that keep to the caches: tile by tile, on a few threads.

numpy's transposing copy of a whole large matrix (`np.copyto(out, a.T)`, `np.ascontiguousarray(a.T)`)
walks one of the two arrays a row length apart at every element, so nearly every access misses the
caches and the TLB; tiles that fit the cache make it a few times faster, and the tiles are shared
among threads (numpy copies without the GIL). numpy only: the codec uses it to send a framework's
transposed memory (`rows_into`) and the layouts to convert kernels.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Matrices from this size on are transposed in tiles (`transpose_into`); smaller ones fit the caches whole.
TILED_TRANSPOSE_BYTES = 1024 * 1024
#: A tile: TILE_ROWS rows of the source become as many columns of the result, within blocks of
#: BLOCK x BLOCK elements (a block's tiles stay in the cache while it is written). 32 rows, not 64: a
#: kernel's rows lie a power of two apart, so a tile's rows share cache sets, and 64 of them evict each
#: other. Chosen by `python -m bench.transpose` on this project's machine (bench/README.md).
TILE_ROWS, BLOCK = 32, 512
#: Most threads one transpose uses (the cores the process may run on, up to this).
MAX_TRANSPOSE_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_TRANSPOSE_THREADS, cores))


#: Bytes moved as one element by the first pass of a block's transpose in chunks (_transpose_chunks).
CHUNK_BYTES = 16


def _chunk(source: np.ndarray, target: np.ndarray) -> int:
    """Elements per chunk where a block transposes in chunks (one dtype on both sides, of plain values of 2, 4
    or 8 bytes, both sides' rows contiguous, both sides a multiple of the chunk), else 0: chunks copy bytes,
    so a cast or a Python object's reference is left to numpy."""
    size = source.itemsize
    chunk = CHUNK_BYTES // size
    if (size not in (2, 4, 8) or source.dtype != target.dtype or source.dtype.hasobject
            or source.strides[1] != size or target.strides[1] != size or source.shape[0] % chunk or source.shape[1] % chunk):
        return 0
    return chunk


def _by_tiles(source: np.ndarray, target: np.ndarray) -> None:
    """target[...] = source.T, TILE_ROWS rows of the source at a time: numpy's element-by-element copy, on a
    tile whose rows stay in the cache until they are read whole."""
    for row in range(0, source.shape[0], TILE_ROWS):
        target[:, row : row + TILE_ROWS] = source[row : row + TILE_ROWS].T


def _transpose_chunks(source: np.ndarray, target: np.ndarray, chunk: int, scratch: np.ndarray) -> None:
    """target[...] = source.T in two passes that each move far fewer elements a row apart than one: the
    source's rows seen as chunks of `chunk` elements (16 bytes) are transposed as a matrix of chunks into
    `scratch` (tile by tile), and each chunk x chunk square of that then lands in `target`'s rows, read
    16 bytes apart within the cache. Bit for bit numpy's own copy: both passes copy bytes, no arithmetic."""
    rows, cols = source.shape
    wide = source.view(np.complex128)  # [rows, cols / chunk], 16 bytes each
    moved = scratch[: rows * cols // chunk].reshape(cols // chunk, rows)
    _by_tiles(wide, moved)
    # moved[k, i] holds source[i, k*chunk : (k+1)*chunk]; target[k*chunk + j, b*chunk + i] = source[b*chunk + i, k*chunk + j]
    squares = moved.view(source.dtype).reshape(cols // chunk, rows // chunk, chunk, chunk)
    np.copyto(target.reshape((cols // chunk, chunk, rows // chunk, chunk), copy=False), squares.transpose(0, 3, 1, 2))


_local = threading.local()


def _scratch(itemsize: int) -> np.ndarray:
    """This thread's memory for a block's chunks (kept: a move transposes a band after another on one thread)."""
    size = BLOCK * BLOCK * itemsize // CHUNK_BYTES
    scratch = getattr(_local, "scratch", None)
    if scratch is None or len(scratch) < size:
        scratch = _local.scratch = np.empty(size, np.complex128)
    return scratch


def _transpose_blocks(src: np.ndarray, out: np.ndarray, blocks: list[tuple[int, int]]) -> None:
    for i, j in blocks:
        source, target = src[i : i + BLOCK, j : j + BLOCK], out[j : j + BLOCK, i : i + BLOCK]
        chunk = _chunk(source, target)
        if chunk:
            _transpose_chunks(source, target, chunk, _scratch(source.itemsize))
        else:
            _by_tiles(source, target)


def transpose_into(src: np.ndarray, out: np.ndarray, threads: int | None = None) -> None:
    """out[...] = src.T for a 2-D `src` (any strides) and `out` of the transposed shape: the same values as
    np.copyto(out, src.T), bit for bit, tile by tile on up to MAX_TRANSPOSE_THREADS threads for a large one
    (`threads`: at most that many; a move's band transposes take 1, as the move keeps the cores busy already)."""
    if src.ndim != 2 or out.shape != src.shape[::-1]:
        raise ValueError(f"transpose_into: {list(src.shape)} does not transpose to {list(out.shape)}")
    rows, cols = src.shape
    if src.nbytes < TILED_TRANSPOSE_BYTES:
        np.copyto(out, src.T)
        return
    blocks = [(i, j) for i in range(0, rows, BLOCK) for j in range(0, cols, BLOCK)]
    threads = min(_threads(), threads or _threads(), len(blocks))
    if threads == 1:
        _transpose_blocks(src, out, blocks)
        return
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="transpose")
        pool = _pool
    share = -(-len(blocks) // threads)
    parts = [pool.submit(_transpose_blocks, src, out, blocks[k : k + share]) for k in range(0, len(blocks), share)]
    for part in parts:
        part.result()


def rows_into(matrix_t: np.ndarray, start: int, stop: int, out: np.ndarray, threads: int | None = None) -> None:
    """Rows start:stop of `matrix_t` (a 2-D array whose transpose is C-contiguous, such as a
    framework's [in, out] kernel seen as [out, in]) written C-contiguous into `out` ([stop - start,
    columns]), tile by tile: a band of a transposed matrix, without transposing the whole."""
    transpose_into(matrix_t[start:stop].T, out, threads)
