"""Small helpers shared by the test tiers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctrl_c_reaches_it() -> None:
    """`preexec_fn` for a child a test stops with SIGINT, as Ctrl-C would: a test runner started in the
    background (`nohup`, `&` in a script) hands SIGINT on ignored, and Python then keeps it ignored, so
    the child would run on as if no Ctrl-C came."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def require_tool(names: tuple[str, ...], install_hint: str) -> str:
    """The first of `names` found on PATH or in .tools/bin. CI must have it (the test fails there);
    elsewhere the test is skipped with the hint."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path=str(REPO / ".tools" / "bin"))
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide {names[0]} ({install_hint})")
    pytest.skip(f"needs {names[0]}: {install_hint}")


def seed_manifest() -> dict:
    """The parameter manifest of the seed's MLP (784-128-64-10) on MNIST."""
    from weightrelay import models

    return models.resolve(models.builtin("mlp"), (1, 28, 28), 10).manifest


def idx_bytes(array) -> bytes:
    """An IDX file (unsigned bytes) holding `array`."""
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype("u1").tobytes()


def write_idx_dataset(directory: Path, train: int = 600, test: int = 100, seed: int = 0) -> Path:
    """Small MNIST-family files in the real format (gzipped IDX, the real names): each class a
    different blob, so a model can learn something."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for part, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count).astype(np.uint8)
        images = rng.integers(0, 60, size=(count, 28, 28)).astype(np.int64)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + row * 12 : 12 + row * 12, 2 + col * 5 : 7 + col * 5] += 190
        (directory / f"{part}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images.clip(0, 255))))
        (directory / f"{part}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return directory


def cifar10_batch(count: int, rng) -> bytes:
    """CIFAR-10 binary records: a label byte, then 1024 red, 1024 green and 1024 blue bytes."""
    import numpy as np

    labels = rng.integers(0, 10, size=count).astype(np.uint8)
    images = rng.integers(0, 256, size=(count, 3, 32, 32)).astype(np.uint8)
    images[np.arange(count), labels % 3, :8, :8] = 255  # a class hint in one corner of one channel
    return b"".join(bytes([label]) + image.tobytes() for label, image in zip(labels, images))


def write_cifar10(directory: Path, per_batch: int = 100, test: int = 100, seed: int = 0, archive: bool = False) -> Path:
    """CIFAR-10's binary version in the real layout: cifar-10-batches-bin/ with five training batches and
    test_batch.bin, or the same members in cifar-10-binary.tar.gz."""
    import io
    import tarfile

    import numpy as np

    rng = np.random.default_rng(seed)
    files = {f"data_batch_{i}.bin": cifar10_batch(per_batch, rng) for i in range(1, 6)}
    files["test_batch.bin"] = cifar10_batch(test, rng)
    files["batches.meta.txt"] = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"
    directory.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(directory / "cifar-10-binary.tar.gz", "w:gz") as tar:
            for name, payload in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (directory / "cifar-10-batches-bin").mkdir(exist_ok=True)
        for name, payload in files.items():
            (directory / "cifar-10-batches-bin" / name).write_bytes(payload)
    return directory


def wait_until_free(worker, within: float, message: str, poll: float = 0.1) -> None:
    """Call Evaluate until the worker takes model calls again (it answers FAILED_PRECONDITION while training);
    fail with `message` if that takes longer than `within` seconds."""
    import time

    import grpc

    started = time.monotonic()
    while True:
        try:
            worker.client.evaluate()
            return
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert time.monotonic() - started < within, message
            time.sleep(poll)
