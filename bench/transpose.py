"""`python -m bench.transpose`: CPU seconds per GiB of the tiled transposes a move makes, by tile shape.

A cross-framework move transposes every large dense kernel once or twice (weightrelay.transpose): a
sender reads its [in, out] kernel a band of rows of the canonical [out, in] matrix at a time
(`rows_into`, codec.wire), a receiver writes each band it received into the columns of the
framework's kernel (weightrelay.conversion), and the layouts transpose whole matrices. Each case is
timed on one thread (as a move runs them) for every `--tiles` shape (TILE_ROWS x BLOCK), in chunks
(two passes, as the transposes run: transpose._transpose_chunks) and in one pass of tiles (as they ran
before), 16384 x 16384 float32 as `bench.transfer --pairs` moves, bands of codec.wire.BAND_BYTES; the
shape in use is marked. Which shape is fastest depends on the machine's caches: numpy's strided copy runs element by
element, and a tile whose rows lie a power of two apart in memory share cache sets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import table, write
from weightrelay import transpose
from weightrelay.codec.wire import BAND_BYTES

SIDE = 16384


def _one_pass(source: np.ndarray, target: np.ndarray) -> int:
    return 0  # transpose._chunk's answer for a block that is not moved in chunks


def _tiled(src: np.ndarray, out: np.ndarray, tile_rows: int, block: int, chunks: bool) -> None:
    """transpose.transpose_into on one thread with the given tile shape, in chunks or in one pass."""
    saved = transpose.TILE_ROWS, transpose.BLOCK, transpose._chunk
    transpose.TILE_ROWS, transpose.BLOCK = tile_rows, block
    if not chunks:
        transpose._chunk = _one_pass
    try:
        transpose.transpose_into(src, out, threads=1)
    finally:
        transpose.TILE_ROWS, transpose.BLOCK, transpose._chunk = saved


def _cpu_per_gib(run, nbytes: int) -> float:
    start = time.process_time()
    run()
    return (time.process_time() - start) / (nbytes / 2**30)


def measure(tile_rows: int, block: int, chunks: bool, kernel: np.ndarray, out: np.ndarray, rows: int) -> dict:
    """CPU s/GiB of the three cases over the first `rows` rows' worth of bands."""
    band_rows = max(1, BAND_BYTES // (SIDE * 4))
    band = np.ones((band_rows, SIDE), np.float32)
    starts = range(0, rows, band_rows)
    nbytes = len(starts) * band.nbytes
    send = _cpu_per_gib(lambda: [_tiled(kernel[:, s : s + band_rows], band, tile_rows, block, chunks) for s in starts], nbytes)
    receive = _cpu_per_gib(lambda: [_tiled(band, out[:, s : s + band_rows], tile_rows, block, chunks) for s in starts], nbytes)
    whole = _cpu_per_gib(lambda: _tiled(kernel[:rows], out[:, :rows], tile_rows, block, chunks), rows * SIDE * 4)
    return {"tile_rows": tile_rows, "block": block, "chunks": chunks, "send_band_cpu_s_per_gib": send,
            "receive_band_cpu_s_per_gib": receive, "whole_cpu_s_per_gib": whole}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transpose", description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", default="64x1024,32x1024,32x512",
                        help="tile shapes to time, TILE_ROWSxBLOCK, comma-separated (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=4096, help="rows of the matrix transposed per case (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="times every shape runs, taking turns; the least is reported")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    shapes = [(*(int(n) for n in item.lower().split("x")), chunks) for chunks in (True, False) for item in args.tiles.split(",")]
    rng = np.random.default_rng(0)
    kernel = rng.random((SIDE, SIDE), dtype=np.float32)
    out = np.ones((SIDE, SIDE), np.float32)  # touched: page faults are not a transpose's cost
    best: dict[tuple[int, int, bool], dict] = {}
    for _ in range(args.rounds):  # in turns, so that a slow spell of a shared machine falls on every shape
        for shape in shapes:
            result = measure(*shape, kernel, out, args.rows)
            kept = best.setdefault(shape, result)
            for key in ("send_band_cpu_s_per_gib", "receive_band_cpu_s_per_gib", "whole_cpu_s_per_gib"):
                kept[key] = min(kept[key], result[key])
    in_use = (transpose.TILE_ROWS, transpose.BLOCK, True)
    rows = [[f"{r}x{b}" + (" (in use)" if (r, b, c) == in_use else ""), "chunks" if c else "one pass", v["send_band_cpu_s_per_gib"],
             v["receive_band_cpu_s_per_gib"], v["whole_cpu_s_per_gib"]] for (r, b, c), v in best.items()]
    print(f"CPU s/GiB on one thread, {SIDE}x{SIDE} float32, bands of {BAND_BYTES // 2**20} MiB, least of {args.rounds}")
    print(table(["tile", "transpose", "send band", "receive band", "whole matrix"], rows))
    print(f"written: {write('transpose', {'rows': args.rows, 'band_bytes': BAND_BYTES, 'in_use': list(in_use), 'tiles': list(best.values())}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
