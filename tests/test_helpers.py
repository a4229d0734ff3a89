"""The shared helpers (issue 14): atomic writes and JSON in kfacbound.io, the dataset forms in
kfacbound.data. Expectations are written out by hand or computed independently (hashlib, numpy's
generator), not with the helpers themselves."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from kfacbound.data import dataset_tensors, resolve_dataset
from kfacbound.errors import KfacboundError
from kfacbound.io import (
    atomic_write,
    canonical_json,
    to_jsonable,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)

# ---------------------------------------------------------------------------- atomic writes


def test_write_json_atomic_text(tmp_path):
    path = tmp_path / "sub" / "x.json"  # parents are created
    write_json_atomic(path, {"b": [1, 2], "a": "é"})
    assert path.read_text() == '{\n  "a": "\\u00e9",\n  "b": [\n    1,\n    2\n  ]\n}\n'
    write_json_atomic(path, {"b": 1, "a": 2}, indent=1, sort_keys=False, newline=False)
    assert path.read_text() == '{\n "b": 1,\n "a": 2\n}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_write_json_atomic_leaves_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": 1, "b": object()})
    with pytest.raises(ValueError):  # circular reference
        loop: list = []
        loop.append(loop)
        write_json_atomic(path, loop)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "new.json", {"b": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # and no partial new file


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failing_midway_leaves_nothing_partial(tmp_path, error):
    path = tmp_path / "data.bin"
    path.write_bytes(b"complete")
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise error("interrupted")

    with pytest.raises(error):
        atomic_write(path, write)
    assert path.read_bytes() == b"complete"
    assert not os.path.exists(seen[0])
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
    assert Path(seen[0]).parent == tmp_path and Path(seen[0]).name.startswith(".data.bin.")


def test_atomic_files_get_plain_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text_atomic(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode


def test_write_csv_atomic(tmp_path):
    path = tmp_path / "t.csv"
    write_csv_atomic(path, [{"a": 1, "b": None, "extra": 9}, {"a": "x,y"}], ["a", "b"])
    assert path.read_bytes() == b'a,b\r\n1,\r\n"x,y",\r\n'  # the csv module's dialect


# ---------------------------------------------------------------------------- JSON data


def test_to_jsonable():
    value = {1: (np.float32(0.5), np.int64(3)), "t": torch.tensor([1.0, 2.0]),
             "s": torch.tensor(7), "p": Path("/a/b"), "nan": math.nan, "inf": [math.inf],
             "arr": np.arange(3), "ok": [True, None, "s", 2]}
    assert to_jsonable(value) == {"1": [0.5, 3], "t": [1.0, 2.0], "s": 7, "p": "/a/b",
                                  "nan": None, "inf": [None], "arr": [0, 1, 2],
                                  "ok": [True, None, "s", 2]}
    assert json.dumps(to_jsonable(value), allow_nan=False)  # strict JSON
    with pytest.raises(TypeError, match="not JSON-able"):
        to_jsonable({"x": object()})
    assert to_jsonable({"x": {2, 1}}, default=sorted) == {"x": [1, 2]}


def test_canonical_json_and_the_job_key():
    from kfacbound.batch.records import job_key

    assert canonical_json({"b": [1, 2.5], "a": "é"}) == '{"a":"\\u00e9","b":[1,2.5]}'
    with pytest.raises(ValueError):
        canonical_json({"a": math.nan})
    config = {"kind": "train", "seed": 0, "label": {"arch": "shown, not hashed"}}
    assert job_key(config) == hashlib.sha256(b'{"kind":"train","seed":0}').hexdigest()


# ---------------------------------------------------------------------------- dataset forms


def _gaussian_inputs(n, dim, seed, split):
    """What the gaussian source draws (see kfacbound.data._gaussian), computed here."""
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    return torch.as_tensor(rng.standard_normal((n, dim)), dtype=torch.float32)


def test_dataset_tensors_of_each_form():
    X, y = torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    ds = TensorDataset(X, y)
    got = dataset_tensors(ds)
    assert got[0] is X and got[1] is y
    assert dataset_tensors((X, y))[0] is X and dataset_tensors([X, y])[1] is y
    sub = Subset(ds, [4, 1, 2])
    Xs, ys = dataset_tensors(sub)
    assert Xs.tolist() == [[8.0, 9.0], [2.0, 3.0], [4.0, 5.0]] and ys.tolist() == [1, 1, 0]
    Xss, yss = dataset_tensors(Subset(sub, range(1, 3)))  # a subset of a subset
    assert Xss.tolist() == [[2.0, 3.0], [4.0, 5.0]] and yss.tolist() == [1, 0]
    assert dataset_tensors(Subset(ds, []))[0].shape == (0, 2)
    with pytest.raises(KfacboundError, match="TensorDataset"):
        dataset_tensors([1, 2, 3])
    with pytest.raises(KfacboundError):
        dataset_tensors(X)


def test_resolve_dataset_from_a_name_and_a_spec():
    ds = resolve_dataset("gaussian", "test", n=5, input_dim=3, classes=2, seed=4)
    assert torch.allclose(ds.X, _gaussian_inputs(5, 3, 4, "test"))
    assert ds.spec["split"] == "test" and len(ds) == 5
    # a spec as a checkpoint records it: its split and selection do not decide the data
    spec = {"name": "gaussian", "split": "train", "selection": "first 3", "n": 6,
            "input_dim": 2, "classes": 3, "seed": 1}
    test = resolve_dataset(spec, "test")
    assert torch.allclose(test.X, _gaussian_inputs(6, 2, 1, "test"))
    assert test.spec["split"] == "test" and "selection" not in test.spec
    bigger = resolve_dataset(spec, "train", n=8)  # options override the spec's
    assert torch.allclose(bigger.X, _gaussian_inputs(8, 2, 1, "train"))
    assert spec["n"] == 6  # the caller's dict is not changed


def test_resolve_dataset_falls_back_to_the_default_spec():
    default = {"name": "gaussian", "n": 4, "input_dim": 2, "seed": 3}
    ds = resolve_dataset(None, "train", default=default)
    assert torch.allclose(ds.X, _gaussian_inputs(4, 2, 3, "train"))
    assert len(resolve_dataset(None, "test", default=default, n=7)) == 7
    with pytest.raises(KfacboundError, match="no dataset given and the checkpoint records none"):
        resolve_dataset(None)
    with pytest.raises(KfacboundError, match="^the job has none$"):
        resolve_dataset(None, default={}, missing="the job has none")


def test_resolve_dataset_passes_data_through():
    X, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    ds = TensorDataset(X, y)
    assert resolve_dataset(ds, "test") is ds
    pair = (X, y)
    assert resolve_dataset(pair) is pair
    sub = Subset(ds, [0])
    assert resolve_dataset(sub) is sub
    with pytest.raises(KfacboundError, match="not int"):
        resolve_dataset(3)
