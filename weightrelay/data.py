"""Image data sets (the MNIST family in IDX files, CIFAR-10's binary version), read and
preprocessed identically by every worker.

Every worker loads the same bytes with this module and normalises them with the same numpy
code, so identical weights see identical inputs; the fingerprint lets the coordinator check
that two workers really hold the same data before it relays anything between them. Nothing
here unpickles: CIFAR-10 comes from its binary version (label byte + 3072 channel-planar
bytes a record), read straight out of the archive.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import logging
import os
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weightrelay.files import write_atomic

log = logging.getLogger(__name__)

DATA_DIR_ENV = "WEIGHTRELAY_DATA_DIR"    # MNIST's directory (kept from before other data sets)
DATA_ROOT_ENV = "WEIGHTRELAY_DATA_ROOT"  # data set NAME lives in ROOT/NAME
MEAN, STD = 0.1307, 0.3081

#: The four IDX files of the MNIST family, by role.
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
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_MEMBER_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = "test_batch.bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32


@dataclass(frozen=True)
class DatasetSpec:
    """A known data set: its format, where it is downloaded from, and how it is normalised."""

    name: str
    format: str                          # "idx" or "cifar10-bin"
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mirrors: tuple[str, ...] = ()
    #: downloaded file -> (hash algorithm, hex digest) of the file as served
    checksums: dict[str, tuple[str, str]] = field(default_factory=dict)
    title: str = ""  # how messages spell it, e.g. "MNIST"


DIGITS = tuple(str(i) for i in range(10))
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "idx", DIGITS, (MEAN,), (STD,), MIRRORS,
                         {f"{stem}.gz": ("sha256", digest) for stem, digest in GZ_SHA256.items()}, "MNIST"),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "idx",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (0.2860,), (0.3530,),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {"train-images-idx3-ubyte.gz": ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
         "train-labels-idx1-ubyte.gz": ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
         "t10k-images-idx3-ubyte.gz": ("md5", "bef4ecab320f06d8554ea6380940ec79"),
         "t10k-labels-idx1-ubyte.gz": ("md5", "bb300cfdad3c16e7a12a480ee83cd310")},
        "Fashion-MNIST",
    ),
    "kmnist": DatasetSpec(
        "kmnist", "idx", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        (0.1918,), (0.3483,),
        ("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        {"train-images-idx3-ubyte.gz": ("md5", "bdb82020997e1d708af4cf47b453dcf7"),
         "train-labels-idx1-ubyte.gz": ("md5", "e144d726b3acfaa3e44228e80efcd344"),
         "t10k-images-idx3-ubyte.gz": ("md5", "5c965bf0a639b31b8f53240b1b52f4d7"),
         "t10k-labels-idx1-ubyte.gz": ("md5", "7320c461ea6c1c855c0b718fb2a4b134")},
        "KMNIST",
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar10-bin",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("https://www.cs.toronto.edu/~kriz/",),
        {CIFAR10_ARCHIVE: ("md5", "c32a1d4ab5d03f1284b67883e8d87530")},
        "CIFAR-10",
    ),
}
DATASET_HELP = f"use one of {', '.join(DATASETS)}, or a directory holding IDX files or CIFAR-10's binary batches"
DEFAULT_DATASET = "mnist"

_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(RuntimeError):
    """The data set is missing or damaged; the message names the file and the fix."""


class UnknownDataset(DataError):
    """The name is no known data set, or the directory holds none."""


def default_data_dir(name: str = DEFAULT_DATASET) -> Path:
    """Where data set `name` lives by default: for MNIST $WEIGHTRELAY_DATA_DIR when set; else
    $WEIGHTRELAY_DATA_ROOT/NAME; else ~/.cache/weightrelay/NAME."""
    if name == "mnist" and os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    root = os.environ.get(DATA_ROOT_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "weightrelay") / name


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


def _missing_message(spec: DatasetSpec, data_dir: Path, missing: list[str], reason: str) -> str:
    if spec.format == "idx":
        wanted = f"the four files {', '.join(f'{s}.gz' for s in FILES.values())} (gzipped or raw)"
        lacks = ", ".join(f"{stem}.gz" for stem in missing)
    else:
        wanted = f"{CIFAR10_ARCHIVE}, or its {CIFAR10_MEMBER_DIR}/ with {', '.join(CIFAR10_TRAIN)} and {CIFAR10_TEST}"
        lacks = ", ".join(missing)
    env = DATA_DIR_ENV if spec.name == "mnist" else DATA_ROOT_ENV
    return (
        f"{spec.title or spec.name} data directory {data_dir} lacks {lacks} ({reason}). Put {wanted} there, "
        f"or pass --data-dir / set {env} to a directory that has them."
    )


def _verify(payload: bytes, algorithm: str, expected: str) -> bool:
    return hashlib.new(algorithm, payload).hexdigest() == expected


def download_files(spec: DatasetSpec, data_dir: Path, names: list[str], timeout: float = 60.0) -> None:
    """Fetch files of `spec` into `data_dir`, each verified against its published checksum.

    A lock file serialises concurrent workers, and each file is renamed into place only
    when complete, so a reader never sees half a file.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            if (data_dir / name).is_file():
                continue  # another process fetched it while we waited
            errors = []
            for mirror in spec.mirrors:
                url = f"{mirror}{name}"
                try:
                    log.info("downloading %s", url)
                    with urllib.request.urlopen(url, timeout=timeout) as response:
                        payload = response.read()
                except OSError as exc:
                    errors.append(f"{url}: {exc}")
                    continue
                if not _verify(payload, *spec.checksums[name]):
                    errors.append(f"{url}: checksum mismatch")
                    continue
                write_atomic(data_dir / name, payload)
                break
            else:
                stem = name.removesuffix(".gz") if spec.format == "idx" else name  # the message names IDX files by stem + .gz
                raise DataError(_missing_message(spec, data_dir, [stem], "download failed: " + "; ".join(errors)))


@dataclass
class Split:
    """Preprocessed inputs (float32 [n, C, H, W]) and true labels (int64 [n])."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    fingerprint: str
    data_dir: Path
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def preprocess(images: np.ndarray, mean: tuple[float, ...] = (MEAN,), std: tuple[float, ...] = (STD,)) -> np.ndarray:
    """uint8 [n, H, W] or [n, C, H, W] -> float32 [n, C, H, W], (x/255 - mean[c]) / std[c]."""
    if images.ndim == 3:
        images = images[:, None]
    x = images.astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - m) / s


def fingerprint(raw_sha256: dict[str, str]) -> str:
    """SHA-256 over a `sha256sum`-style listing of the decompressed files, sorted by name."""
    listing = "".join(f"{raw_sha256[stem]}  {stem}\n" for stem in sorted(raw_sha256))
    return hashlib.sha256(listing.encode()).hexdigest()


def _read_idx_set(data_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    for role, stem in FILES.items():
        path = _find(data_dir, stem)
        assert path is not None
        arrays[role], raw = read_idx_file(path)
        digests[stem] = hashlib.sha256(raw).hexdigest()
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{data_dir}: {part} images {list(images.shape)} and labels {list(labels.shape)} do not match")
    return arrays, digests


def parse_cifar10_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 3, 32, 32] and labels of one CIFAR-10 binary batch."""
    if not raw or len(raw) % CIFAR10_RECORD:
        raise DataError(f"{source}: {len(raw)} bytes is not a whole number of {CIFAR10_RECORD}-byte CIFAR-10 records")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise DataError(f"{source}: label {int(labels.max())} is out of range 0-9; not a CIFAR-10 batch")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _cifar10_sources(data_dir: Path) -> dict[str, Path]:
    """Each batch file found as a file (in DIR or DIR/cifar-10-batches-bin)."""
    found = {}
    for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
        for candidate in (data_dir / name, data_dir / CIFAR10_MEMBER_DIR / name):
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def _read_cifar10(data_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    raw: dict[str, bytes] = {name: path.read_bytes() for name, path in _cifar10_sources(data_dir).items()}
    archive = data_dir / CIFAR10_ARCHIVE
    if len(raw) < 6 and archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:  # read the known members only; nothing is extracted
                for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
                    member = tar.extractfile(f"{CIFAR10_MEMBER_DIR}/{name}")
                    if member is None:
                        raise KeyError(name)
                    raw[name] = member.read()
        except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
            raise DataError(f"{archive}: not a complete CIFAR-10 binary archive ({exc}); delete it so it is fetched again") from exc
    train = [parse_cifar10_batch(raw[name], name) for name in CIFAR10_TRAIN]
    test_images, test_labels = parse_cifar10_batch(raw[CIFAR10_TEST], CIFAR10_TEST)
    arrays = {
        "train_images": np.concatenate([images for images, _ in train]),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test_images": test_images,
        "test_labels": test_labels,
    }
    return arrays, {name: hashlib.sha256(data).hexdigest() for name, data in raw.items()}


def _missing_files(spec: DatasetSpec, data_dir: Path) -> list[str]:
    if spec.format == "idx":
        return [stem for stem in FILES.values() if _find(data_dir, stem) is None]
    if (data_dir / CIFAR10_ARCHIVE).is_file():
        return []
    found = _cifar10_sources(data_dir)
    return [name for name in (*CIFAR10_TRAIN, CIFAR10_TEST) if name not in found]


def detect_format(data_dir: Path) -> str | None:
    """"idx" or "cifar10-bin" by the files present, else None."""
    if any(_find(data_dir, stem) for stem in FILES.values()):
        return "idx"
    if (data_dir / CIFAR10_ARCHIVE).is_file() or _cifar10_sources(data_dir):
        return "cifar10-bin"
    return None


def resolve_dataset(name_or_dir: str, data_dir: Path | str | None = None) -> tuple[DatasetSpec, Path]:
    """The spec and directory of a data set given by name (optionally with its directory) or by a directory.

    A directory whose name is a known data set's (e.g. .../fashion-mnist) takes that set's class
    names and normalisation; any other directory of IDX files is normalised with its own training
    split's statistics (mean and std are None until loaded).
    """
    key = name_or_dir.strip().lower()
    if key in DATASETS:
        spec = DATASETS[key]
        return spec, Path(data_dir).expanduser() if data_dir else default_data_dir(key)
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        raise UnknownDataset(f"unknown data set {name_or_dir!r}; {DATASET_HELP}")
    known = DATASETS.get(path.resolve().name.lower())
    fmt = detect_format(path)
    if known and (fmt is None or fmt == known.format):
        return known, path
    if fmt == "cifar10-bin":
        return DATASETS["cifar10"], path
    if fmt == "idx":
        return DatasetSpec(path.resolve().name, "idx", (), (), ()), path
    raise UnknownDataset(f"{path} holds neither IDX files nor CIFAR-10 binary batches; {DATASET_HELP}")


def load_dataset(name_or_dir: str = DEFAULT_DATASET, data_dir: Path | str | None = None, download: bool = True) -> Dataset:
    """Load and preprocess a data set, downloading missing files when allowed and reachable."""
    spec, directory = resolve_dataset(name_or_dir, data_dir)
    missing = _missing_files(spec, directory)
    if missing:
        if not download or not spec.mirrors:
            raise DataError(_missing_message(spec, directory, missing, "downloads are off" if spec.mirrors else "it cannot be downloaded"))
        wanted = [f"{stem}.gz" for stem in missing] if spec.format == "idx" else [CIFAR10_ARCHIVE]
        try:
            download_files(spec, directory, wanted)
        except OSError as exc:
            raise DataError(_missing_message(spec, directory, missing, f"cannot download into it: {exc}")) from exc
    arrays, digests = _read_idx_set(directory) if spec.format == "idx" else _read_cifar10(directory)
    class_names, mean, std = spec.class_names, spec.mean, spec.std
    if not class_names:  # a directory of unknown IDX files: labels 0..max, its own statistics
        count = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
        class_names = tuple(str(i) for i in range(count))
    images = arrays["train_images"] if arrays["train_images"].ndim == 4 else arrays["train_images"][:, None]
    if not mean:
        scaled = images.astype(np.float64) / 255.0
        mean = tuple(float(m) for m in scaled.mean(axis=(0, 2, 3)))
        std = tuple(float(s) for s in scaled.std(axis=(0, 2, 3)))
    if len(mean) != images.shape[1]:
        raise DataError(f"{directory}: images have {images.shape[1]} channel(s), {spec.name} expects {len(mean)}")
    for part in ("train", "test"):
        labels = arrays[f"{part}_labels"]
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"{directory}: {part} labels go up to {int(labels.max())}, {spec.name} has {len(class_names)} classes")
    return Dataset(
        name=spec.name,
        train=Split(preprocess(arrays["train_images"], mean, std), arrays["train_labels"].astype(np.int64)),
        test=Split(preprocess(arrays["test_images"], mean, std), arrays["test_labels"].astype(np.int64)),
        fingerprint=fingerprint(digests),
        data_dir=directory.resolve(),
        class_names=tuple(class_names),
        mean=tuple(mean),
        std=tuple(std),
    )


def load_mnist(data_dir: Path | str | None = None, download: bool = True) -> Dataset:
    """MNIST (see load_dataset)."""
    return load_dataset("mnist", data_dir, download)


def main(argv: list[str] | None = None) -> int:
    """`python -m weightrelay.data fetch|check [--dataset NAME] --data-dir D`: get a data set once
    before the workers start (fetch), or wait until it is there (check --wait), printing its fingerprint."""
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="python -m weightrelay.data")
    parser.add_argument("action", choices=("fetch", "check"), help="fetch: download what is missing, then verify; check: verify only")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help=f"{', '.join(DATASETS)} or a directory (default {DEFAULT_DATASET})")
    parser.add_argument("--data-dir", default=None, help=f"default: ${DATA_DIR_ENV} for mnist, else ${DATA_ROOT_ENV}/NAME, else ~/.cache/weightrelay/NAME")
    parser.add_argument("--wait", type=float, default=0, help="check: keep trying this many seconds while files are missing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            data = load_dataset(args.dataset, args.data_dir, download=args.action == "fetch")
            break
        except DataError as exc:
            if time.monotonic() >= deadline:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            time.sleep(2)
    print(f"{data.name} in {data.data_dir}: {len(data.train.y)} training and {len(data.test.y)} test images, fingerprint {data.fingerprint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
