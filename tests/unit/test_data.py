import gzip
import hashlib
import struct

import numpy as np
import pytest

from weightrelay.data import FILES, DataError, fingerprint, load_mnist, parse_idx, preprocess, read_idx_file


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


RNG = np.random.default_rng(3)
IMAGES = RNG.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
LABELS = RNG.integers(0, 10, size=12, dtype=np.uint8)


def test_parse_good_images_and_labels():
    assert np.array_equal(parse_idx(idx_bytes(IMAGES)), IMAGES)
    assert np.array_equal(parse_idx(idx_bytes(LABELS)), LABELS)


def test_gzipped_and_raw_files_read_the_same(tmp_path):
    (tmp_path / "a").write_bytes(idx_bytes(IMAGES))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(IMAGES)))
    raw, raw_bytes = read_idx_file(tmp_path / "a")
    gz, gz_bytes = read_idx_file(tmp_path / "a.gz")
    assert np.array_equal(raw, gz) and raw_bytes == gz_bytes  # fingerprinted on decompressed bytes


@pytest.mark.parametrize("cut", [1, 100, 9])
def test_truncated_file_is_refused(cut):
    data = idx_bytes(IMAGES)
    with pytest.raises(DataError, match="truncated"):
        parse_idx(data[: len(data) - cut] if cut != 9 else data[:9], "x.idx")


def test_trailing_bytes_are_refused():
    with pytest.raises(DataError, match="trailing bytes"):
        parse_idx(idx_bytes(LABELS) + b"\0", "labels")


@pytest.mark.parametrize("magic", [b"\x08\x03\x00\x00", b"\x00\x00\x07\x01", b"PK\x03\x04"])
def test_wrong_magic_is_refused(magic):
    with pytest.raises(DataError, match="wrong magic number"):
        parse_idx(magic + idx_bytes(LABELS)[4:], "labels")


def write_dataset(directory, gz=True):
    for role, stem in FILES.items():
        array = IMAGES if role.endswith("images") else LABELS
        payload = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / stem).write_bytes(payload)


def test_load_preprocesses_and_fingerprints(tmp_path):
    write_dataset(tmp_path)
    data = load_mnist(tmp_path, download=False)
    assert data.train.x.shape == (12, 784) and data.train.x.dtype == np.float32
    expected = ((IMAGES.reshape(12, -1) / 255.0 - 0.1307) / 0.3081).astype(np.float32)
    np.testing.assert_allclose(data.train.x, expected, rtol=1e-6, atol=1e-6)
    assert data.test.y.tolist() == LABELS.tolist()
    digests = {stem: hashlib.sha256(idx_bytes(IMAGES if "images" in stem else LABELS)).hexdigest() for stem in FILES.values()}
    assert data.fingerprint == fingerprint(digests)
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    write_dataset(raw_dir, gz=False)
    assert load_mnist(raw_dir, download=False).fingerprint == data.fingerprint


def test_missing_files_name_the_directory_and_the_files(tmp_path):
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path) in message
    for stem in FILES.values():
        assert f"{stem}.gz" in message


def test_preprocess_is_float32_and_flat():
    x = preprocess(IMAGES[:2])
    assert x.dtype == np.float32 and x.shape == (2, 784)
