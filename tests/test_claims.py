"""The structure claims' measurements and verdicts on hand-made structure reports."""

from __future__ import annotations

import numpy as np
import pytest

from kfacbound.analysis.claims import claim_rows, claim_summary, layer_measurements, mean_sd


def _report(overlaps, rank1s, aligns, outliers, n=1000, C=3, dim=50):
    """A structure report of len(rank1s) models and the given pair overlap curves (k = 4)."""
    models = [{"label": f"s{i}", "bn": False, "expected_outliers": C - 1,
               "layers": {"fc1": {"dim": dim, "k": 4, "rank1": [r, 0.1, 0.1, 0.1],
                                  "align_A_mean": a, "outliers_exact": o,
                                  "overlap_exact_kfac": [0.9, 0.8, 0.7, 0.6],
                                  "rel_frobenius": 0.3}}}
              for i, (r, a, o) in enumerate(zip(rank1s, aligns, outliers, strict=True))]
    pairs = [{"a": "s0", "b": "s1", "group": "no-bn", "layer": "fc1", "exact": c,
              "kfac": [min(1.0, x + 0.1) for x in c]} for c in overlaps]
    return {"meta": {"n": n, "k": 4, "layers": ["fc1"]}, "models": models, "pairs": pairs}


def test_mean_sd_is_the_sample_statistic():
    m, sd, n = mean_sd([1.0, 2.0, None, 4.0])
    assert (m, n) == (pytest.approx(7 / 3), 3)
    assert sd == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert mean_sd([]) == (None, None, 0)


def test_measurements_use_k_equal_c_minus_1():
    rep = _report([[0.9, 0.8, 0.7, 0.6], [0.7, 0.6, 0.5, 0.4]], [0.9, 0.7], [0.95, 0.97], [2, 3])
    m = layer_measurements(rep)["fc1"]
    assert m["k"][0] == 2  # C − 1 = 2
    assert m["overlap_exact"][0] == pytest.approx(0.7)  # mean of 0.8 and 0.6 at k = 2
    assert m["overlap_exact"][1] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert m["rank1"][0] == pytest.approx(0.8)
    assert m["exact_kfac"][0] == pytest.approx(0.8)


def test_verdicts_follow_the_documented_rules():
    high = _report([[0.9, 0.85, 0.8, 0.7]] * 3, [0.9, 0.95, 0.92], [0.95, 0.96, 0.97], [2, 2, 3])
    low = _report([[0.05, 0.05, 0.05, 0.05], [0.06, 0.05, 0.05, 0.05], [0.04, 0.05, 0.05, 0.05]],
                  [0.3, 0.35, 0.32], [0.2, 0.25, 0.3], [0, 1, 0])
    for rep in (high, low):
        for m in rep["models"]:
            m["bn"] = rep is low
    cells = {("mlp", False, 1000): high, ("mlp", True, 1000): low,
             ("mlp", False, 200): _report([[0.5, 0.5, 0.5, 0.5]] * 3, [0.9] * 3, [0.9] * 3,
                                          [2] * 3, n=200)}
    rows = {(r["claim"], r["layer"]): r for r in claim_rows(cells)}
    ov = rows[("overlap", "fc1")]["verdict"]
    assert "no BN: reproduced" in ov and "BN: not reproduced" in ov  # 0.05 < 10 × k/p = 0.4
    assert rows[("bn_overlap", "fc1")]["verdict"] == "reproduced"
    assert "no BN: reproduced" in rows[("rank1", "fc1")]["verdict"]
    assert "BN: not reproduced" in rows[("rank1", "fc1")]["verdict"]
    assert "BN lowers it" in rows[("alignment", "fc1")]["verdict"]
    assert "no BN: reproduced" in rows[("outliers", "fc1")]["verdict"]
    assert "BN: not reproduced" in rows[("outliers", "fc1")]["verdict"]  # mean 1/3 vs C−1 = 2
    st = rows[("stability", "fc1")]
    assert "no BN: not stable" in st["verdict"]  # 0.5 → 0.85
    summary = claim_summary(list(rows.values()))
    assert any(s["claim"] == "overlap" and "reproduced" in s["verdicts"] for s in summary)
