"""``kfacbound curvature`` end to end: checkpoint + dataset -> factor file (against the API)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kfacbound.checkpoint import save_checkpoint
from kfacbound.cli import main
from kfacbound.curvature.kfac import KFACResult, compute_kfac
from kfacbound.data import load_dataset
from kfacbound.models import build_model, resolve_spec


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A BN CNN on 8×8 digits, with its dataset recorded in the checkpoint."""
    data = load_dataset("digits", subset=60)
    spec = resolve_spec("cnn", input_shape=list(data.tensors[0].shape[1:]),
                        num_outputs=data.num_classes, channels=[3], widths=[5], bn=True)
    model = build_model(spec, seed=0).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("kfac") / "cnn.kfb"
    save_checkpoint(path, model, spec, dataset=data.spec, loss="ce")
    return path, data


def test_curvature_cli_writes_factors(ckpt, tmp_path):
    path, data = ckpt
    out = tmp_path / "f.safetensors"
    res = CliRunner().invoke(main, ["curvature", str(path), "--method", "kflr", "--batch-size",
                                    "16", "--no-progress", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "conv1" in res.output and "bn_conv1" in res.output
    got = KFACResult.load(out)
    from kfacbound.checkpoint import load_checkpoint

    ref = compute_kfac(load_checkpoint(path).model, data, method="kflr", batch_size=16,
                       progress=False)
    assert list(got) == ["conv1", "fc1", "out"]
    for name in ref:
        torch.testing.assert_close(got[name].G, ref[name].G)
        torch.testing.assert_close(got[name].A, ref[name].A)
    assert got.meta["n"] == 60 and got.meta["method"] == "kflr"
    assert got.meta["dataset"]["name"] == "digits" and got.meta["conv_convention"] == "kfc-expand"
    assert set(got.bn_diag) == {"bn_conv1", "bn1"}


def test_curvature_cli_json_and_options(ckpt, tmp_path):
    path, _ = ckpt
    out = tmp_path / "g.safetensors"
    res = CliRunner().invoke(main, [
        "curvature", str(path), "--dataset", "digits", "--subset", "20", "--method", "kfac",
        "--mc-samples", "2", "--bias", "separate", "--backend", "backpack", "--no-progress",
        "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    js = json.loads(res.output)
    assert js["meta"]["n"] == 20 and js["meta"]["mc_samples"] == 2
    assert js["meta"]["backend"] == "backpack" and js["meta"]["bias"] == "separate"
    assert KFACResult.load(out)["out"].G_bias is not None


def test_curvature_cli_errors(ckpt, tmp_path):
    path, _ = ckpt
    out = str(tmp_path / "h.safetensors")
    runner = CliRunner()
    res = runner.invoke(main, ["curvature", str(tmp_path / "none.kfb"), "-o", out])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(main, ["curvature", str(path), "--method", "kfra", "--backend", "native",
                               "--no-progress", "-o", out])
    assert res.exit_code == 2 and "KFRA" in res.output
    res = runner.invoke(main, ["curvature", str(path), "--loss", "bce", "--no-progress", "-o", out])
    assert res.exit_code == 2 and "one output logit" in res.output
