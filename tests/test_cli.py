"""The command line through click's CliRunner: help, the happy path and every error path."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kfacbound.cli import SUBCOMMANDS, main
from kfacbound.models import build_model, resolve_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "m.kfb"
    result = CliRunner().invoke(main, [
        "train", "--arch", "fc", "--widths", "16", "--dataset", "digits", "--binary",
        "--epochs", "2", "--lr", "0.05", "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _error(result, pattern: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert pattern.lower() in result.output.lower()
    assert "Traceback" not in result.output


def test_help_of_every_subcommand():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    listed = [c for c in SUBCOMMANDS.values() if f"  {c} " in top.output]
    assert {"train", "info", "import", "datasets"} <= set(listed)
    for cmd in listed:
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, cmd


def test_datasets_lists_names():
    res = CliRunner().invoke(main, ["datasets", "--no-check"])
    assert res.exit_code == 0 and "mnist5k" in res.output and "fashion-mnist" in res.output


def test_train_and_info(trained):
    res = CliRunner().invoke(main, ["info", str(trained)])
    assert res.exit_code == 0
    assert "fc1" in res.output and "digits" in res.output and "train_error" in res.output
    js = json.loads(CliRunner().invoke(main, ["info", str(trained), "--json"]).output)
    assert js["params"] == 64 * 16 + 16 + 17 and js["has_init"]


def test_unknown_dataset_and_arch(tmp_path):
    out = tmp_path / "x.kfb"
    _error(CliRunner().invoke(main, ["train", "--arch", "fc", "--dataset", "imagenet",
                                     "-o", str(out)]), "unknown dataset")
    _error(CliRunner().invoke(main, ["train", "--arch", "vgg", "--dataset", "digits",
                                     "--epochs", "1", "-o", str(out)]), "unknown architecture")
    assert not out.exists()


def test_missing_and_corrupt_checkpoint(tmp_path, trained):
    _error(CliRunner().invoke(main, ["info", str(tmp_path / "none.kfb")]), "not found")
    data = trained.read_bytes()
    bad = tmp_path / "trunc.kfb"
    bad.write_bytes(data[: len(data) - 100])
    _error(CliRunner().invoke(main, ["info", str(bad)]), "truncated")
    bad.write_bytes(b"\x00" * 50)
    _error(CliRunner().invoke(main, ["info", str(bad)]), "kfacbound checkpoint")


def test_import_paths(tmp_path):
    spec = resolve_spec("fc", [1, 8, 8], 1, widths=[5])
    model = build_model(spec, seed=0)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    runner = CliRunner()
    out = tmp_path / "imp.kfb"
    ok = runner.invoke(main, ["import", str(tmp_path / "sd.pt"), "--arch",
                              '{"arch": "fc", "widths": [5]}', "--dataset", "digits", "--binary",
                              "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "without w0" in ok.output
    # wrong architecture: clear error, no output file
    out2 = tmp_path / "bad.kfb"
    _error(runner.invoke(main, ["import", str(tmp_path / "sd.pt"), "--arch", "T-600",
                                "--dataset", "digits", "--binary", "-o", str(out2)]),
           "does not fit")
    assert not out2.exists()
    # NaN weights
    with torch.no_grad():
        model.out.weight[0, 0] = float("nan")
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    _error(runner.invoke(main, ["import", str(tmp_path / "nan.pt"), "--arch",
                                '{"arch": "fc", "widths": [5]}', "--input-shape", "1,8,8",
                                "--num-outputs", "1", "-o", str(out2)]), "non-finite")
    assert not out2.exists()
    # missing file
    _error(runner.invoke(main, ["import", str(tmp_path / "nope.pt"), "--arch", "fc",
                                "--input-shape", "64", "--num-outputs", "2", "-o", str(out2)]),
           "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imp.kfb", "nan.pt", "sd.pt"]
