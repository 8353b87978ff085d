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
#: other (`python -m bench.transpose`: a sender's bands 1.44 -> 0.89 CPU s/GiB, a receiver's 1.10 -> 0.99).
TILE_ROWS, BLOCK = 32, 1024
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


def _transpose_blocks(src: np.ndarray, out: np.ndarray, blocks: list[tuple[int, int]]) -> None:
    for i, j in blocks:
        source, target = src[i : i + BLOCK, j : j + BLOCK], out[j : j + BLOCK, i : i + BLOCK]
        for row in range(0, source.shape[0], TILE_ROWS):
            target[:, row : row + TILE_ROWS] = source[row : row + TILE_ROWS].T


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
