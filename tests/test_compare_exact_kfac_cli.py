"""``kfacbound spectrum`` through click's CliRunner: table, JSON keys, plot, exit codes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kfacbound.checkpoint import save_checkpoint
from kfacbound.cli import main
from kfacbound.data import load_dataset
from kfacbound.models import build_model, resolve_spec

DATA = {"n": 30, "input_dim": 5, "classes": 3}


def make_checkpoint(path, seed=0, bn=False, widths=(6,), epoch=None, errors=None):
    """A tiny gaussian-data checkpoint (untrained weights; metrics optional)."""
    data = load_dataset("gaussian", **DATA)
    spec = resolve_spec({"arch": "fc", "widths": list(widths), "bn": bn},
                        input_shape=data.input_shape, num_outputs=data.num_outputs)
    model = build_model(spec, seed=seed).eval()
    metrics = {}
    if epoch is not None:
        metrics["epoch"] = epoch
    if errors is not None:
        metrics.update(train_error=errors[0], test_error=errors[1])
    save_checkpoint(path, model, spec, init_model=build_model(spec, seed=seed),
                    dataset=data.spec, loss="ce", metrics=metrics)
    return str(path)


def error_exit(result, pattern):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert pattern.lower() in result.output.lower() and "Traceback" not in result.output


def test_spectrum_cli(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.kfb")
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    res = CliRunner().invoke(main, ["spectrum", ckpt, "--k", "4", "--no-progress",
                                    "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "layer fc1" in res.output and "λ_i(K-FAC)" in res.output
    js = json.loads(out.read_text())
    assert set(js) == {"meta", "layers"}
    assert js["meta"]["kfac_method"] == "kflr" and js["meta"]["n"] == 30
    row = js["layers"][0]
    assert {"layer", "dim", "k", "method", "exact", "kfac", "overlap", "rel_frobenius",
            "random_overlap"} <= set(row)
    assert len(row["overlap"]["H"]) == 4 and len(row["exact"]["H_O"]) == 4
    assert png.stat().st_size > 1000


def test_spectrum_cli_options_and_errors(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.kfb", bn=True)
    out = tmp_path / "s.json"
    res = CliRunner().invoke(main, ["spectrum", ckpt, "--layer", "out", "--k", "3",
                                    "--compare", "kfac", "--mc-samples", "4", "--parts", "H",
                                    "--dense-limit", "0", "--subset", "20", "--no-progress",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    js = json.loads(out.read_text())
    assert [r["layer"] for r in js["layers"]] == ["out"]
    assert js["layers"][0]["method"] == "lanczos" and js["meta"]["n"] == 20
    assert js["layers"][0]["rel_frobenius"]["H"]["method"].startswith("hutchinson")
    assert js["meta"]["kfac_method"] == "kfac" and set(js["layers"][0]["exact"]) == {"H"}
    # precomputed factors (KFACResult.save) give the same K-FAC eigenvalues
    import torch

    from kfacbound.checkpoint import load_checkpoint
    from kfacbound.curvature.kfac import compute_kfac
    from kfacbound.data import load_dataset

    data = load_dataset("gaussian", subset=20, **DATA)
    kf = compute_kfac(load_checkpoint(ckpt).model, data, "ce", "kfac", mc_samples=4,
                      progress=False)
    kf.save(tmp_path / "f.safetensors")
    out2 = tmp_path / "s2.json"
    res = CliRunner().invoke(main, ["spectrum", ckpt, "--layer", "out", "--k", "3",
                                    "--factors", str(tmp_path / "f.safetensors"), "--parts", "H",
                                    "--subset", "20", "--no-progress", "--json", str(out2)])
    assert res.exit_code == 0, res.output
    ref = torch.linalg.eigvalsh(kf["out"].to_dense()).flip(0)[:3]
    got = json.loads(out2.read_text())["layers"][0]["kfac"]["eigenvalues"]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref, rtol=1e-8)
    error_exit(CliRunner().invoke(main, ["spectrum", ckpt, "--layer", "fc7"]), "fc7")
    error_exit(CliRunner().invoke(main, ["spectrum", ckpt, "--k", "0"]), "--k")
    error_exit(CliRunner().invoke(main, ["spectrum", str(tmp_path / "none.kfb")]), "not found")
