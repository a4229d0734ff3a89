"""CIFAR-10 (python-pickle format, synthetic files) end to end on a ResNet through the CLI:
train → info → curvature → spectrum → structure.

Checks against independent computations: Ã of fc from pooled features captured by a plain hook,
the exact fc Hessian eigenvalues from ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call

from kfacbound.checkpoint import load_checkpoint
from kfacbound.cli import main
from kfacbound.curvature.kfac import KFACResult
from kfacbound.data import load_dataset

ARCH = '{"arch": "resnet", "blocks": [1, 1], "channels": [4, 8]}'


def write_cifar(root, n_per_batch: int = 8, seed: int = 0) -> None:
    """cifar-10-batches-py/{data_batch_1..5, test_batch}: dicts with bytes keys, as the real files
    (b"data" uint8 N × 3072 channel-major, b"labels" list, b"batch_label", b"filenames"); the
    class sets the mean colour, so the task is learnable."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        labels = [(i * n_per_batch + j) % 10 for j in range(n_per_batch)]
        base = np.array([[25 * lab, 255 - 25 * lab, 128] for lab in labels], dtype=np.float64)
        imgs = base[:, :, None] + rng.normal(0, 20, (n_per_batch, 3, 1024))
        data = np.clip(imgs, 0, 255).astype(np.uint8).reshape(n_per_batch, 3072)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{j}.png".encode() for j in range(n_per_batch)]}
        with open(d / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)


def _run(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    ckpts = []
    for seed in (0, 1):
        out = root / f"r{seed}.kfb"
        _run(["train", "--arch", ARCH, "--dataset", "cifar10", "--data-dir", str(root),
              "--epochs", "3", "--batch-size", "8", "--seed", str(seed), "--no-progress",
              "-o", str(out)])
        ckpts.append(out)
    return root, ckpts


def test_cifar_reader_layout(tmp_path):
    write_cifar(tmp_path, n_per_batch=3)
    train = load_dataset("cifar10", data_dir=str(tmp_path))
    test = load_dataset("cifar10", "test", data_dir=str(tmp_path / "cifar-10-batches-py"))
    assert train.X.shape == (15, 3, 32, 32) and len(test) == 3 and train.num_classes == 10
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    # row k: 1024 red values, then green, then blue, each 32 × 32 row-major
    img = raw[b"data"][1]
    ref = torch.tensor(np.stack([img[:1024], img[1024:2048], img[2048:]]).reshape(3, 32, 32),
                       dtype=torch.float32) / 255
    assert torch.equal(train.X[4], ref) and train.y[4].item() == raw[b"labels"][1]


def test_cifar_bad_batch_is_one_line_error(tmp_path):
    write_cifar(tmp_path, n_per_batch=2)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, fh)
    from kfacbound.errors import KfacboundError

    with pytest.raises(KfacboundError, match="3072"):
        load_dataset("cifar10", "test", data_dir=str(tmp_path))
    res = CliRunner().invoke(main, ["train", "--arch", "resnet8", "--dataset", "cifar10",
                                    "--data-dir", str(tmp_path / "missing"), "-o",
                                    str(tmp_path / "x.kfb")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "does not exist" in res.output


def test_train_and_info(trained):
    _, (ckpt_path, _) = trained
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.spec["arch"] == "resnet" and ckpt.spec["input_shape"] == [3, 32, 32]
    assert ckpt.dataset["name"] == "cifar10" and ckpt.init_model is not None
    res = _run(["info", str(ckpt_path)])
    assert "resnet" in res.output


def test_curvature_on_resnet_checkpoint(trained, tmp_path):
    root, (ckpt_path, _) = trained
    out = tmp_path / "f.safetensors"
    _run(["curvature", str(ckpt_path), "--method", "kflr", "--batch-size", "16", "--no-progress",
          "-o", str(out)])
    got = KFACResult.load(out)
    model = load_checkpoint(ckpt_path).model
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(got) == convs and "layer2.0.downsample.0" in got
    assert "layer2.0.downsample.1" in got.bn_diag
    # Ã of fc = mean of [h; 1][h; 1]ᵀ over the 40 training images, h the pooled features
    X = load_dataset("cifar10", data_dir=str(root)).X
    feats = []
    h = model.fc.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    with torch.no_grad():
        model(X)
    h.remove()
    ht = torch.cat([feats[0], torch.ones(len(X), 1)], 1).to(torch.float64)
    torch.testing.assert_close(got["fc"].A, ht.T @ ht / len(X), rtol=1e-5, atol=1e-7)
    res = CliRunner().invoke(main, ["curvature", str(ckpt_path), "--backend", "backpack",
                                    "-o", str(tmp_path / "g.safetensors")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "native" in res.output


def test_spectrum_and_structure_on_resnet(trained, tmp_path):
    root, (a, b) = trained
    out = tmp_path / "s.json"
    _run(["spectrum", str(a), "--subset", "16", "--layer", "fc", "--k", "3", "--no-progress",
          "--json", str(out)])
    (entry,) = json.loads(out.read_text())["layers"]
    assert entry["layer"] == "fc"
    # independent: the fc block of the Hessian of the mean CE loss by autograd, float64
    model = load_checkpoint(a).model.double()
    data = load_dataset("cifar10", data_dir=str(root), subset=16)
    X, y = data.X.double(), data.y
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def f(w, bias):
        ps = dict(params, **{"fc.weight": w, "fc.bias": bias})
        return nn.functional.cross_entropy(functional_call(model, (ps, buffers), (X,)), y)
    Hw = torch.autograd.functional.hessian(f, (params["fc.weight"].detach(),
                                               params["fc.bias"].detach()))
    p_w = params["fc.weight"].numel()
    H = torch.cat([torch.cat([Hw[0][0].reshape(p_w, p_w), Hw[0][1].reshape(p_w, -1)], 1),
                   torch.cat([Hw[1][0].reshape(-1, p_w), Hw[1][1]], 1)], 0)
    ref = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:3]
    np.testing.assert_allclose(entry["exact"]["H"][:3], ref, rtol=1e-6)
    sj = tmp_path / "st.json"
    _run(["structure", str(a), str(b), "--subset", "16", "--layer", "layer2.0.downsample.0",
          "--k", "3", "--no-progress", "--json", str(sj)])
    assert "layer2.0.downsample.0" in sj.read_text()
