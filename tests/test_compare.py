"""The BatchNorm report (`kfacbound compare`): pairing no-BN/BN, every column, figures; from a
finished batch of fake analyses and from real checkpoints through the real bound API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfacbound.batch import parse_spec, run_batch
from kfacbound.batch.spec import job_key
from kfacbound.cli import main

HERE = __name__


def fake_train(config, out_dir):
    path = Path(out_dir) / "checkpoints" / f"{job_key(config)}.kfb"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return {"checkpoint": str(path.relative_to(out_dir))}


def fake_bound(config, out_dir):
    """Numbers that encode (bn, seed, posterior) so the pairing can be checked."""
    bn, seed = config["bn"], config["seed"]
    shift = 0.5 if config["options"]["posterior"] == "kfac" else 0.0
    return {"bound": 0.1 + 0.01 * seed + (0.05 if bn else 0.0) + shift,
            "kl": 1000.0 + seed + (500 if bn else 0), "snn_train_error": 0.02 + 0.001 * seed,
            "snn_test_error": 0.03, "test_error": 0.01 if bn else 0.02}


def fake_structure(config, out_dir):
    bn = config["bn"]
    return {"k": 5, "layers": {
        layer: {"overlap": 0.3 if bn else 0.9, "rank1_ratio": 0.4 if bn else 0.95,
                "outliers": 2 if bn else 9, "top_eigenvalue": 3.0 if bn else 40.0,
                "top_eigenvalues": [3.0, 2.0, 1.0] if bn else [40.0, 30.0, 1.0],
                "overlap_curve": [0.2, 0.3] if bn else [0.8, 0.9]}
        for layer in ("fc1", "out")}}


SPEC = f"""
name = "bn-fake"
seeds = [0, 1]
bn = [false, true]
datasets = ["digits"]
architectures = [{{ arch = "fc", widths = [8], label = "tiny" }}]
[[analyses]]
kind = "bound"
[analyses.grid]
posterior = ["diag", "kfac"]
[[analyses]]
kind = "structure"
[kinds]
train = "{HERE}:fake_train"
bound = {{ entry = "{HERE}:fake_bound", needs = "checkpoint" }}
structure = {{ entry = "{HERE}:fake_structure", needs = "checkpoints" }}
"""


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_compare_report_from_batch_has_every_column(tmp_path):
    out = tmp_path / "batch"
    outcome = run_batch(parse_spec(SPEC), out, executor="inline", progress=False)
    assert not outcome.all_failed
    res = CliRunner().invoke(main, ["compare", "--batch", str(out), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "r" / "report.md").read_text()
    for column in ("bound", "kl", "snn_train_error", "snn_test_error", "test_error", "overlap",
                   "rank1_ratio", "outliers", "top_eigenvalue"):
        assert f"| {column} (no BN) | {column} (BN) |" in report, column
    for fig in ("bounds.png", "structure.png", "eigenvalues.png", "overlap.png"):
        assert f"]({fig})" in report
        assert (tmp_path / "r" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bounds = _rows(tmp_path / "r" / "bounds.csv")
    # 2 posteriors × (2 seeds + mean); every row pairs the same seed and posterior
    assert len(bounds) == 6
    for row in bounds:
        shift = 0.5 if row["variant"] == "posterior=kfac" else 0.0
        seed = 0.5 if row["seed"] == "mean" else float(row["seed"])
        assert float(row["bound (no BN)"]) == pytest.approx(0.1 + 0.01 * seed + shift)
        assert float(row["bound (BN)"]) == pytest.approx(0.15 + 0.01 * seed + shift)
        assert float(row["kl (BN)"]) - float(row["kl (no BN)"]) == pytest.approx(500)
    layers = _rows(tmp_path / "r" / "layers.csv")
    assert [r["layer"] for r in layers] == ["fc1", "out"]
    assert all(r["outliers (no BN)"] == "9" and r["outliers (BN)"] == "2" for r in layers)
    assert all(r["overlap (no BN)"] == "0.9" and r["rank1_ratio (BN)"] == "0.4"
               for r in layers)
    # bad input is a clear error (exit 2)
    res = CliRunner().invoke(main, ["compare", "-o", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "either checkpoint files or --batch" in res.output
    res = CliRunner().invoke(main, ["compare", "--batch", str(tmp_path), "-o",
                                    str(tmp_path / "r2")])
    assert res.exit_code == 2 and "no results.jsonl" in res.output


def test_compare_checkpoints_runs_the_real_bound(tmp_path, tiny_binary):
    """Two tiny networks (with/without BN) certified through certify_checkpoint: the report's
    numbers equal the certificates, and each certificate recomputes from its own terms."""
    from kfacbound.bounds import recompute_certificate
    from kfacbound.data import load_dataset
    from kfacbound.train import TrainConfig, train_model

    test = load_dataset("mnist5k", "test", binary=True, subset=100, downsample=8)
    paths = []
    for bn in (False, True):
        path = tmp_path / f"m{int(bn)}.kfb"
        train_model({"arch": "fc", "widths": [6]}, tiny_binary, test,
                    TrainConfig(epochs=1, lr=0.05), out=path, progress=False, bn=bn)
        paths.append(str(path))
    from kfacbound.batch.compare import compare_checkpoints

    report = compare_checkpoints(paths, tmp_path / "r", bound={"iterations": 10,
                                                               "mc_passes": 1},
                                 structure=None, executor="inline", progress=False,
                                 threads=1)
    text = report.read_text()
    assert "bound (no BN)" in text
    (row,) = _rows(tmp_path / "r" / "bounds.csv")
    certs = sorted((tmp_path / "r" / "batch" / "artifacts").glob("*.cert.json"))
    assert len(certs) == 2
    by_side = {}
    for cert_path in certs:
        cert = json.loads(cert_path.read_text())
        assert recompute_certificate(cert) == pytest.approx(cert["bound"], rel=1e-9)
        assert 0 < cert["bound"] <= 1
        by_side["BN" if cert["checkpoint"]["spec"]["bn"] else "no BN"] = cert
    assert set(by_side) == {"BN", "no BN"}
    for side, cert in by_side.items():
        assert float(row[f"bound ({side})"]) == pytest.approx(cert["bound"])
        assert float(row[f"kl ({side})"]) == pytest.approx(cert["kl"])
        assert float(row[f"snn_train_error ({side})"]) == pytest.approx(cert["mc_error"])
    # a rerun uses the cached batch: nothing runs again
    from kfacbound.batch.report import batch_records

    n = len(batch_records(tmp_path / "r" / "batch"))
    compare_checkpoints(paths, tmp_path / "r", bound={"iterations": 10, "mc_passes": 1},
                        structure=None, executor="inline", progress=False, threads=1)
    assert len((tmp_path / "r" / "batch" / "results.jsonl").read_text().splitlines()) == n
