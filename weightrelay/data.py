"""MNIST from its IDX files, read and preprocessed identically by every worker.

Every worker loads the same bytes with this module and normalises them with the same numpy
code, so identical weights see identical inputs; the fingerprint lets the coordinator check
that two workers really hold the same data before it relays anything between them.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightrelay.files import write_atomic

log = logging.getLogger(__name__)

DATA_DIR_ENV = "WEIGHTRELAY_DATA_DIR"
MEAN, STD = 0.1307, 0.3081

#: The four files, by role, with the SHA-256 of their gzipped and decompressed contents.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
GZ_SHA256 = {
    "train-images-idx3-ubyte": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
#: Mirrors that serve the original gzipped files (the ones torchvision uses).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(RuntimeError):
    """The data set is missing or damaged; the message names the file and the fix."""


def default_data_dir() -> Path:
    """$WEIGHTRELAY_DATA_DIR, else ~/.cache/weightrelay/mnist."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "weightrelay" / "mnist"


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file's (decompressed) bytes."""
    if len(raw) < 4:
        raise DataError(f"{source}: {len(raw)} bytes is too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{source}: wrong magic number {raw[:4].hex()}; not an IDX file (expected 0000 08 0N)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{source}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[raw[2]]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise DataError(f"{source}: {what}: shape {list(shape)} needs {expected} data bytes, the file has {body}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx_file(path: Path) -> tuple[np.ndarray, bytes]:
    """The array and the decompressed bytes of an IDX file, gzipped or raw."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: damaged gzip data ({exc}); delete it so it is fetched again") from exc
    return parse_idx(raw, str(path)), raw


def _missing_message(data_dir: Path, missing: list[str], reason: str) -> str:
    names = ", ".join(f"{stem}.gz" for stem in missing)
    return (
        f"MNIST data directory {data_dir} lacks {names} ({reason}). Put the four files "
        f"{', '.join(f'{s}.gz' for s in FILES.values())} there (gzipped or raw), "
        f"or pass --data-dir / set {DATA_DIR_ENV} to a directory that has them."
    )


def download_mnist(data_dir: Path, stems: list[str], timeout: float = 30.0) -> None:
    """Fetch missing gzipped files into `data_dir`, verified by SHA-256.

    A lock file serialises concurrent workers, and each file is renamed into place only
    when complete, so a reader never sees half a file.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stem in stems:
            if _find(data_dir, stem):
                continue  # another process fetched it while we waited
            errors = []
            for mirror in MIRRORS:
                url = f"{mirror}{stem}.gz"
                try:
                    log.info("downloading %s", url)
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        payload = response.read()
                except OSError as exc:
                    errors.append(f"{url}: {exc}")
                    continue
                if hashlib.sha256(payload).hexdigest() != GZ_SHA256[stem]:
                    errors.append(f"{url}: checksum mismatch")
                    continue
                write_atomic(data_dir / f"{stem}.gz", payload)
                break
            else:
                raise DataError(_missing_message(data_dir, [stem], "download failed: " + "; ".join(errors)))


@dataclass
class Split:
    """Preprocessed inputs (float32 [n, 784]) and true labels (int64 [n])."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class MnistData:
    train: Split
    test: Split
    fingerprint: str
    data_dir: Path


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28] -> float32 [n, 784], (x/255 - 0.1307)/0.3081."""
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(MEAN)) / np.float32(STD)


def fingerprint(raw_sha256: dict[str, str]) -> str:
    """SHA-256 over a `sha256sum`-style listing of the decompressed files, sorted by name."""
    listing = "".join(f"{raw_sha256[stem]}  {stem}\n" for stem in sorted(raw_sha256))
    return hashlib.sha256(listing.encode()).hexdigest()


def load_mnist(data_dir: Path | str | None = None, download: bool = True) -> MnistData:
    """Load and preprocess MNIST, downloading missing files when allowed and reachable."""
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    missing = [stem for stem in FILES.values() if _find(data_dir, stem) is None]
    if missing:
        if not download:
            raise DataError(_missing_message(data_dir, missing, "downloads are off"))
        try:
            download_mnist(data_dir, missing)
        except OSError as exc:
            raise DataError(_missing_message(data_dir, missing, f"cannot download into it: {exc}")) from exc
    arrays: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    for role, stem in FILES.items():
        path = _find(data_dir, stem)
        assert path is not None
        arrays[role], raw = read_idx_file(path)
        digests[stem] = hashlib.sha256(raw).hexdigest()
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{data_dir}: {part} images {list(images.shape)} and labels {list(labels.shape)} do not match"
            )
    return MnistData(
        train=Split(preprocess(arrays["train_images"]), arrays["train_labels"].astype(np.int64)),
        test=Split(preprocess(arrays["test_images"]), arrays["test_labels"].astype(np.int64)),
        fingerprint=fingerprint(digests),
        data_dir=data_dir.resolve(),
    )



def main(argv: list[str] | None = None) -> int:
    """`python -m weightrelay.data fetch|check --data-dir D`: get MNIST once before the workers
    start (fetch), or wait until it is there (check --wait), printing its fingerprint."""
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="python -m weightrelay.data")
    parser.add_argument("action", choices=("fetch", "check"), help="fetch: download what is missing, then verify; check: verify only")
    parser.add_argument("--data-dir", default=None, help=f"default ${DATA_DIR_ENV}, else ~/.cache/weightrelay/mnist")
    parser.add_argument("--wait", type=float, default=0, help="check: keep trying this many seconds while files are missing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            data = load_mnist(args.data_dir, download=args.action == "fetch")
            break
        except DataError as exc:
            if time.monotonic() >= deadline:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
    print(f"MNIST in {data.data_dir}: {len(data.train.y)} training and {len(data.test.y)} test images, fingerprint {data.fingerprint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
