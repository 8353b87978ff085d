import dataclasses
import gzip
import hashlib

import numpy as np
import pytest

from tests.support import idx_bytes, write_cifar10, write_idx_dataset
from weightrelay.data import (
    DATASETS,
    FILES,
    DataError,
    default_data_dir,
    download_files,
    fingerprint,
    load_dataset,
    load_mnist,
    parse_idx,
    preprocess,
    read_idx_file,
)


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
    assert data.train.x.shape == (12, 1, 28, 28) and data.train.x.dtype == np.float32
    assert data.name == "mnist" and data.class_names == tuple("0123456789") and data.input_shape == (1, 28, 28)
    expected = ((IMAGES[:, None] / 255.0 - 0.1307) / 0.3081).astype(np.float32)
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


def test_a_failed_download_names_the_file_it_could_not_fetch(tmp_path):
    unreachable = dataclasses.replace(DATASETS["mnist"], mirrors=((tmp_path / "no-mirror").as_uri() + "/",))
    name = f"{FILES['train_images']}.gz"
    with pytest.raises(DataError) as info:
        download_files(unreachable, tmp_path / "mnist", [name])
    message = str(info.value)
    assert f"lacks {name} (download failed: " in message and ".gz.gz" not in message


def test_preprocess_is_float32_nchw_per_channel():
    x = preprocess(IMAGES[:2])
    assert x.dtype == np.float32 and x.shape == (2, 1, 28, 28)
    rgb = RNG.integers(0, 256, size=(2, 3, 4, 4), dtype=np.uint8)
    y = preprocess(rgb, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    for c, (m, s) in enumerate(zip((0.1, 0.2, 0.3), (0.5, 0.25, 0.125))):
        np.testing.assert_allclose(y[:, c], (rgb[:, c] / 255.0 - m) / s, rtol=1e-5, atol=1e-5)


# -- the other data sets, on small generated files in their real formats -------------------
@pytest.mark.parametrize("name,first_class,mean", [("fashion-mnist", "T-shirt/top", 0.2860), ("kmnist", "o", 0.1918)])
def test_mnist_family_by_name_with_class_names_and_normalisation(tmp_path, name, first_class, mean):
    write_idx_dataset(tmp_path / name, train=50, test=20)
    data = load_dataset(name, tmp_path / name, download=False)
    assert data.name == name and data.class_names[0] == first_class and len(data.class_names) == 10
    assert data.train.x.shape == (50, 1, 28, 28) and data.test.x.shape == (20, 1, 28, 28)
    assert data.mean == (mean,)
    raw, _ = read_idx_file(tmp_path / name / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(data.train.x[:, 0], (raw / 255.0 - mean) / DATASETS[name].std[0], rtol=1e-5, atol=1e-5)


def test_a_known_data_set_found_by_its_directory_name(tmp_path):
    write_idx_dataset(tmp_path / "fashion-mnist", train=30, test=10)
    data = load_dataset(str(tmp_path / "fashion-mnist"), download=False)
    assert data.name == "fashion-mnist" and data.class_names[-1] == "Ankle boot"


def test_an_unknown_idx_directory_uses_its_own_statistics(tmp_path):
    write_idx_dataset(tmp_path / "letters", train=40, test=10)
    data = load_dataset(str(tmp_path / "letters"), download=False)
    assert data.name == "letters" and data.class_names == tuple(str(i) for i in range(10))
    assert abs(float(data.train.x.mean())) < 1e-4 and abs(float(data.train.x.std()) - 1) < 1e-3


@pytest.mark.parametrize("archive", [False, True], ids=["batches-dir", "tar.gz"])
def test_cifar10_binary_version(tmp_path, archive):
    write_cifar10(tmp_path / "cifar10", per_batch=20, test=15, archive=archive)
    data = load_dataset("cifar10", tmp_path / "cifar10", download=False)
    assert data.train.x.shape == (100, 3, 32, 32) and data.test.x.shape == (15, 3, 32, 32)
    assert data.class_names[0] == "airplane" and data.input_shape == (3, 32, 32)
    # record layout: label byte, then red, green, blue planes of 32x32
    raw = (tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin").read_bytes() if not archive else None
    if raw is not None:
        record = np.frombuffer(raw[:3073], dtype=np.uint8)
        assert data.test.y[0] == record[0]
        green = record[1 + 1024 : 1 + 2048].reshape(32, 32)
        np.testing.assert_allclose(data.test.x[0, 1], (green / 255.0 - 0.4822) / 0.2435, rtol=1e-5, atol=1e-5)


def test_cifar10_archive_and_batches_have_one_fingerprint(tmp_path):
    write_cifar10(tmp_path / "a", per_batch=10, test=10, seed=3)
    write_cifar10(tmp_path / "b", per_batch=10, test=10, seed=3, archive=True)
    a, b = (load_dataset("cifar10", tmp_path / d, download=False) for d in "ab")
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.train.x, b.train.x)


def test_a_damaged_cifar10_batch_is_refused(tmp_path):
    write_cifar10(tmp_path, per_batch=5, test=5)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-7])
    with pytest.raises(DataError, match="data_batch_3.bin: .* not a whole number of 3073-byte"):
        load_dataset("cifar10", tmp_path, download=False)


def test_missing_cifar10_names_the_archive(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert "cifar-10-binary.tar.gz" in str(info.value) and "downloads are off" in str(info.value)


def test_unknown_data_set_names_the_choices(tmp_path):
    with pytest.raises(DataError, match="unknown data set 'imagenet'; use one of mnist, fashion-mnist, kmnist, cifar10"):
        load_dataset("imagenet", download=False)


def test_default_directories(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTRELAY_DATA_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("WEIGHTRELAY_DATA_ROOT", str(tmp_path / "root"))
    assert default_data_dir("mnist") == tmp_path / "m"
    assert default_data_dir("cifar10") == tmp_path / "root" / "cifar10"
