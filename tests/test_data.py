"""Datasets: the IDX reader on files written here, shapes, balance, binary mapping, determinism."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from kfacbound.data import load_dataset, read_idx, split_dataset
from kfacbound.errors import KfacboundError

from .conftest import requires_fashion


def _write_idx(path, array: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    payload = header + array.astype(dt).tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("code,compress", [(0x08, True), (0x08, False), (0x0C, False),
                                           (0x0D, True)])
def test_read_idx_roundtrip(tmp_path, code, compress):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(7, 5, 3)).astype(np.float64)
    path = tmp_path / ("a.idx" + (".gz" if compress else ""))
    _write_idx(path, arr, code, compress)
    out = read_idx(path)
    assert out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(KfacboundError, match="magic"):
        read_idx(bad)
    arr = np.zeros((4, 3), dtype=np.uint8)
    trunc = tmp_path / "trunc"
    _write_idx(trunc, arr, 0x08, False)
    trunc.write_bytes(trunc.read_bytes()[:-2])
    with pytest.raises(KfacboundError, match="truncated"):
        read_idx(trunc)


def test_user_idx_directory_as_mnist(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)), 0x08, True)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x08, True)
    ds = load_dataset("mnist", "train", data_dir=str(tmp_path))
    assert ds.X.shape == (30, 1, 28, 28) and ds.y.tolist() == [i % 10 for i in range(30)]
    assert float(ds.X.max()) <= 1.0
    test = load_dataset("kmnist", "test", data_dir=str(tmp_path), binary=True)
    assert test.y.tolist() == [int(i % 10 >= 5) for i in range(10)]


def test_missing_files_message(tmp_path):
    with pytest.raises(KfacboundError, match="--data-dir"):
        load_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(KfacboundError, match="cifar"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(KfacboundError, match="unknown dataset"):
        load_dataset("imagenet")


def test_mnist5k_split_shapes_balance_binary():
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert train.X.shape == (4000, 1, 28, 28) and test.X.shape == (1000, 1, 28, 28)
    assert train.X.dtype == torch.float32 and train.y.dtype == torch.int64
    # the 5,000 digits hold 500 of each class; the split keeps all of them, disjointly
    counts = torch.bincount(torch.cat([train.y, test.y]), minlength=10)
    assert counts.tolist() == [500] * 10
    assert counts.min() > 0 and torch.bincount(train.y).min() > 300
    rows = {tuple(x.flatten().tolist()) for x in train.X[:200]}
    assert not any(tuple(x.flatten().tolist()) in rows for x in test.X)
    binary = load_dataset("mnist5k", "train", binary=True)
    assert binary.num_classes == 2 and binary.num_outputs == 1
    assert torch.equal(binary.y, (train.y >= 5).long())
    assert abs(binary.y.float().mean().item() - 0.5) < 0.05


def test_options_deterministic_and_respected():
    a = load_dataset("mnist5k", subset=50, subset_mode="random", seed=3, downsample=8, flatten=True)
    b = load_dataset("mnist5k", subset=50, subset_mode="random", seed=3, downsample=8, flatten=True)
    c = load_dataset("mnist5k", subset=50, subset_mode="random", seed=4, downsample=8, flatten=True)
    assert a.X.shape == (50, 64) and torch.equal(a.X, b.X) and not torch.equal(a.X, c.X)
    first = load_dataset("mnist5k", subset=10)
    full = load_dataset("mnist5k")
    assert torch.equal(first.X, full.X[:10])
    # nearest downsampling (torch: source index floor(i·28/7)) picks original pixels
    small = load_dataset("mnist5k", subset=10, downsample=7)
    assert torch.equal(small.X, full.X[:10, :, ::4, ::4])


def test_standardize_uses_training_statistics():
    train = load_dataset("digits", "train", standardize=True, flatten=True)
    test = load_dataset("digits", "test", standardize=True, flatten=True)
    raw_train = load_dataset("digits", "train", flatten=True)
    raw_test = load_dataset("digits", "test", flatten=True)
    live = raw_train.X.std(0) > 1e-6
    assert torch.allclose(train.X.mean(0)[live], torch.zeros(int(live.sum())), atol=1e-5)
    mean, std = raw_train.X.mean(0), raw_train.X.std(0).clamp_min(1e-6)
    assert torch.allclose(test.X, (raw_test.X - mean) / std, atol=1e-5)


def test_digits_and_gaussian():
    d = load_dataset("digits")
    assert d.X.shape[1:] == (1, 8, 8) and float(d.X.max()) == 1.0
    g = load_dataset("gaussian", n=40, input_dim=16, classes=5, seed=2)
    assert g.X.shape == (40, 16) and g.num_classes == 5 and int(g.y.max()) < 5
    g2 = load_dataset("gaussian", n=40, input_dim=16, classes=5, seed=2)
    assert torch.equal(g.X, g2.X)


def test_npz_and_cifar_reader(tmp_path):
    X = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", X=X, y=y)
    train = load_dataset("npz", path=str(tmp_path / "d.npz"))
    test = load_dataset("npz", "test", path=str(tmp_path / "d.npz"))
    assert len(train) == 16 and len(test) == 4 and train.num_classes == 3
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": list(range(4))}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)
    c = load_dataset("cifar10", data_dir=str(tmp_path))
    assert c.X.shape == (20, 3, 32, 32)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_cifar_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": _Evil(), b"labels": [0]}, fh)
    with pytest.raises(KfacboundError, match="refusing"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert not (tmp_path / "PWNED").exists()


def test_split_dataset_disjoint():
    ds = load_dataset("digits")
    a, b = split_dataset(ds, 0.3, seed=1)
    assert len(a) + len(b) == len(ds) and abs(len(a) - 0.3 * len(ds)) <= 1
    rows = {tuple(x.flatten().tolist()) + (int(t),) for x, t in zip(a.X, a.y, strict=True)}
    overlap = sum(tuple(x.flatten().tolist()) + (int(t),) in rows
                  for x, t in zip(b.X, b.y, strict=True))
    # digits has a few duplicate images; the index split itself is disjoint
    assert overlap <= 5


@requires_fashion
def test_fashion_mnist_debian():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test", binary=True)
    assert train.X.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert test.y.float().mean().item() == 0.5
