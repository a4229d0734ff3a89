"""``kfacbound structure`` through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kfacbound.cli import main
from tests.test_compare_exact_kfac_cli import error_exit, make_checkpoint


def test_structure_cli_bn_and_plain(tmp_path):
    paths = [make_checkpoint(tmp_path / "a0.kfb", 0), make_checkpoint(tmp_path / "a1.kfb", 1),
             make_checkpoint(tmp_path / "bn0.kfb", 0, bn=True),
             make_checkpoint(tmp_path / "bn1.kfb", 1, bn=True)]
    out, png = tmp_path / "st.json", tmp_path / "st.png"
    res = CliRunner().invoke(main, ["structure", *paths, "--k", "3", "--no-progress",
                                    "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "no-bn" in res.output and "bn-vs-no-bn" in res.output
    js = json.loads(out.read_text())
    assert set(js) == {"meta", "models", "pairs", "summary"}
    assert [m["label"] for m in js["models"]] == ["a0.kfb", "a1.kfb", "bn0.kfb", "bn1.kfb"]
    assert [m["bn"] for m in js["models"]] == [False, False, True, True]
    assert len(js["pairs"]) == 6 * 2
    assert {r["group"] for r in js["summary"]} == {"bn", "no-bn", "bn-vs-no-bn"}
    for key in ("overlap_exact", "overlap_kfac", "rank1_top", "align_A_mean", "outliers_exact",
                "expected_outliers", "random_overlap"):
        assert key in js["summary"][0]
    assert png.stat().st_size > 1000


def test_structure_cli_shape_errors(tmp_path):
    a = make_checkpoint(tmp_path / "a.kfb", widths=(6,))
    b = make_checkpoint(tmp_path / "b.kfb", widths=(4,))
    error_exit(CliRunner().invoke(main, ["structure", a, b, "--layer", "fc1", "--no-progress"]),
               "different shapes")
    error_exit(CliRunner().invoke(main, ["structure", a, b, "--no-progress"]), "equal shape")
