"""`python -m bench.transpose`: CPU seconds per GiB of the tiled transposes a move makes, by tile shape.

A cross-framework move transposes every large dense kernel once or twice (weightrelay.transpose): a
sender reads its [in, out] kernel a band of rows of the canonical [out, in] matrix at a time
(`rows_into`, codec.wire), a receiver writes each band it received into the columns of the
framework's kernel (weightrelay.conversion), and the layouts transpose whole matrices. Each case is
timed on one thread (as a move runs them) for every `--tiles` shape (TILE_ROWS x BLOCK), in chunks
(two passes, as the transposes run: transpose._transpose_chunks) and in one pass of tiles (as they ran
before), 16384 x 16384 float32 as `bench.transfer --pairs` moves, bands of codec.wire.BAND_BYTES (`--band-mib`); the
shape in use is marked. Which shape is fastest depends on the machine's caches: numpy's strided copy runs element by
element, and a tile whose rows lie a power of two apart in memory share cache sets.

`--compiled` also times, in the same turns, compiled transposes from bench/transpose_c.c (built here with
the C compiler, `$CC` or `cc`; benchmark only, the workers use numpy): whether a compiled kernel would pay
its build step on this machine.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

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


Transpose = Callable[[np.ndarray, np.ndarray], None]  # (src, out): out[...] = src.T


def measure(run: Transpose, kernel: np.ndarray, out: np.ndarray, rows: int, band_bytes: int = BAND_BYTES) -> dict:
    """CPU s/GiB of the three cases over the first `rows` rows' worth of bands of `band_bytes`."""
    band_rows = max(1, band_bytes // (SIDE * 4))
    band = np.ones((band_rows, SIDE), np.float32)
    starts = range(0, rows, band_rows)
    nbytes = len(starts) * band.nbytes
    send = _cpu_per_gib(lambda: [run(kernel[:, s : s + band_rows], band) for s in starts], nbytes)
    receive = _cpu_per_gib(lambda: [run(band, out[:, s : s + band_rows]) for s in starts], nbytes)
    whole = _cpu_per_gib(lambda: run(kernel[:rows], out[:, :rows]), rows * SIDE * 4)
    return {"send_band_cpu_s_per_gib": send, "receive_band_cpu_s_per_gib": receive, "whole_cpu_s_per_gib": whole}


#: The compiled transposes (bench/transpose_c.c): function -> what it does.
COMPILED = {
    "wr_scalar_blocked": "element by element, blocks 32x32",
    "wr_avx_blocked_32": "AVX 8x8, blocks 32x32",
    "wr_avx_blocked_64x16": "AVX 8x8, blocks 64x16",
    "wr_avx_two_level": "AVX 8x8, blocks 64x64 in 1024x1024",
    "wr_avx_staged": "AVX 8x8 from a padded copy of 256x64",
    "wr_avx_recursive": "AVX 8x8, recursive halves",
    "wr_two_pass": "numpy's two passes, SSE 4x4, blocks of 512",
}


def c_compiler() -> str:
    """The C compiler --compiled builds with: `$CC`, else `cc`."""
    return os.environ.get("CC", "cc")


def compiled_transposes(folder: Path) -> dict[str, Transpose]:
    """bench/transpose_c.c built into `folder` with the C compiler: each function this CPU can run, as a Transpose."""
    library = folder / "transpose_c.so"
    subprocess.run([c_compiler(), "-O2", "-shared", "-fPIC", "-o", str(library), str(Path(__file__).with_name("transpose_c.c"))], check=True)
    lib = ctypes.CDLL(str(library))
    avx = bool(lib.wr_has_avx())
    runs = {}
    for name in COMPILED:
        if "avx" in name and not avx:
            continue
        function = getattr(lib, name)
        function.restype = None
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_size_t] * 4
        runs[name] = _strided_call(function)
    return runs


def _strided_call(function) -> Transpose:
    def run(src: np.ndarray, out: np.ndarray) -> None:
        assert src.dtype == out.dtype == np.float32 and src.strides[1] == out.strides[1] == 4 and out.shape == src.shape[::-1]
        rows, cols = src.shape
        function(src.ctypes.data, out.ctypes.data, rows, cols, src.strides[0] // 4, out.strides[0] // 4)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transpose", description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", default="64x1024,32x1024,32x512",
                        help="tile shapes to time, TILE_ROWSxBLOCK, comma-separated (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=4096, help="rows of the matrix transposed per case (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="times every shape runs, taking turns; the least is reported")
    parser.add_argument("--band-mib", type=float, default=BAND_BYTES / 2**20,
                        help="size of the bands, MiB (default: codec.wire.BAND_BYTES, what a move uses: %(default)s)")
    parser.add_argument("--compiled", action="store_true", help="also time the compiled transposes of bench/transpose_c.c (needs a C compiler)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    in_use = (transpose.TILE_ROWS, transpose.BLOCK, True)
    band_bytes = int(args.band_mib * 2**20)
    cases: list[tuple[list[str], dict, Transpose]] = []  # (tile, transpose) as printed, the JSON keys, the run
    for chunks in (True, False):
        for item in args.tiles.split(","):
            r, b = (int(n) for n in item.lower().split("x"))
            label = [f"{r}x{b}" + (" (in use)" if (r, b, chunks) == in_use else ""), "chunks" if chunks else "one pass"]
            cases.append((label, {"tile_rows": r, "block": b, "chunks": chunks},
                          lambda src, out, r=r, b=b, chunks=chunks: _tiled(src, out, r, b, chunks)))
    with tempfile.TemporaryDirectory() as folder:
        if args.compiled:
            try:
                compiled = compiled_transposes(Path(folder))
            except (OSError, subprocess.CalledProcessError) as exc:
                raise SystemExit(f"--compiled: bench/transpose_c.c could not be built with {c_compiler()}: {exc}") from None
            for name, run in compiled.items():
                cases.append(([COMPILED[name], "compiled (C)"], {"compiled": name}, run))
        rng = np.random.default_rng(0)
        kernel = rng.random((SIDE, SIDE), dtype=np.float32)
        out = np.ones((SIDE, SIDE), np.float32)  # touched: page faults are not a transpose's cost
        best: list[dict] = [dict(keys) for _, keys, _ in cases]
        for round_ in range(args.rounds):  # in turns, so that a slow spell of a shared machine falls on every case
            for (label, _, run), kept in zip(cases, best):
                if round_ == 0:
                    out[:, : args.rows] = 0  # what the case's whole transpose must overwrite (checked below)
                result = measure(run, kernel, out, args.rows, band_bytes)
                if round_ == 0 and not np.array_equal(out[:, : args.rows], kernel[: args.rows].T):
                    raise SystemExit(f"{' '.join(label)}: the result is not the transpose")
                for key, value in result.items():
                    kept[key] = min(kept.get(key, value), value)
    rows = [[*label, v["send_band_cpu_s_per_gib"], v["receive_band_cpu_s_per_gib"], v["whole_cpu_s_per_gib"]]
            for (label, _, _), v in zip(cases, best)]
    print(f"CPU s/GiB on one thread, {SIDE}x{SIDE} float32, bands of {args.band_mib} MiB, least of {args.rounds}")
    print(table(["tile", "transpose", "send band", "receive band", "whole matrix"], rows))
    print(f"written: {write('transpose', {'rows': args.rows, 'band_bytes': band_bytes, 'in_use': list(in_use), 'tiles': best}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
