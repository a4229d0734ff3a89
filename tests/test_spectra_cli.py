"""``kfacbound spectra`` through click's CliRunner: a --save-every-like series."""

from __future__ import annotations

import csv
import json

from click.testing import CliRunner

from kfacbound.cli import main
from tests.test_compare_exact_kfac_cli import error_exit, make_checkpoint


def test_spectra_cli_series(tmp_path):
    paths = [make_checkpoint(tmp_path / f"run-epoch{e:03d}.kfb", seed=e, epoch=e,
                             errors=(0.5 / e, 0.6 / e)) for e in (3, 1, 2)]
    out_csv, out_json, plots = tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "plots"
    res = CliRunner().invoke(main, ["spectra", *paths, "--no-progress", "--csv", str(out_csv),
                                    "--json", str(out_json), "--plot-dir", str(plots)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out_csv)))
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2, 3, 3]
    for key in ("top", "trace", "effective_rank", "stable_rank", "negative_mass",
                "negative_fraction", "condition_number", "outliers", "train_error",
                "test_error"):
        assert rows[0][key] != "", key
    js = json.loads(out_json.read_text())
    assert set(js) == {"meta", "rows", "densities"} and len(js["densities"]) == 6
    assert sorted(p.name for p in plots.iterdir()) == ["density-fc1.png", "density-out.png",
                                                       "metrics.png"]
    # SLQ path for large blocks, one layer
    res = CliRunner().invoke(main, ["spectra", paths[0], "--layer", "fc1", "--dense-limit", "0",
                                    "--slq-probes", "2", "--slq-steps", "10", "--hutchinson",
                                    "8", "--k", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert " slq " in res.output
    error_exit(CliRunner().invoke(main, ["spectra", paths[0], "--layer", "nope"]), "nope")
