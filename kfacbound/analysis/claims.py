"""The Dissecting-Hessian claims as rows: the paper's claim, our measurement with its seed spread,
and a verdict (issue 13).

Input: structure reports (:func:`kfacbound.analysis.structure.structure_report`), one per
(architecture, BN) and sample size, each over networks trained with *different* seeds. Every
measurement is a mean ± standard deviation over the independent units it is defined on: seed
*pairs* for overlaps across networks, *networks* for per-network quantities (rank-1 ratio,
alignment, outliers, K-FAC fidelity). The verdict rules are fixed here, before looking at the
numbers, so that a reader can check them:

==========  ===========================================================================  ======
claim       statement (paper)                                                            rule
==========  ===========================================================================  ======
overlap     top eigenspaces of independently trained networks overlap highly, up to     ≥ 0.5
            k ≈ C − 1 (Wu et al. 2020, "Dissecting Hessian", §5)                         at k
bn_overlap  BatchNorm weakens that overlap (ibid., §6)                                   Δ > 2 se
rank1       top eigenvectors reshaped to out × (in+1) are close to rank 1, u ⊗ E[ã]      ≥ 0.8
            (ibid., §4)
alignment   Ã's top eigenvector aligns with the mean input E[ã]; BN breaks this (ibid.)  ≥ 0.9
outliers    C − 1 eigenvalues stand out of the bulk (Papyan 2019; Wu et al. §3)          |Δ| ≤ 1
kfac        G ⊗ Ã is close to the exact layer block: top-k overlap and relative          ≥ 0.5,
            Frobenius distance (ibid., §4)                                               ≤ 0.5
stability   (ours) the estimate does not move with the sample size                       |Δ| ≤ 0.1
==========  ===========================================================================  ======

k for overlaps is C − 1 (the outlier subspace; 9 for ten classes), capped by the report's k. A
rule that holds partly gives "partly" (overlap: above 10× the random k/p but below 0.5; rank-1:
≥ 0.5; K-FAC: one of the two conditions), and a verdict with too few units ("n/a") says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CLAIMS: dict[str, str] = {
    "overlap": "Top-k eigenspaces of independently trained networks overlap highly "
               "(Wu et al. 2020)",
    "bn_overlap": "BatchNorm weakens the overlap across seeds (Wu et al. 2020)",
    "rank1": "Top eigenvectors are close to rank 1 when reshaped, ≈ u ⊗ E[ã] (Wu et al. 2020)",
    "alignment": "Ã's top eigenvector aligns with E[ã]; BatchNorm breaks it (Wu et al. 2020)",
    "outliers": "C − 1 outlier eigenvalues (Papyan 2019; Wu et al. 2020)",
    "kfac": "G ⊗ Ã is close to the exact block: overlap and relative Frobenius "
            "(Wu et al. 2020)",
    "stability": "The measurement is stable in the number of examples (ours)",
}


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (ddof = 1; 0 for one value), count) of the finite
    values; (None, None, 0) when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return float(np.mean(xs)), sd, len(xs)


def fmt_spread(m: float | None, sd: float | None, n: int) -> str:
    """'0.812 ± 0.031 (n=3)', or '' without values."""
    if m is None:
        return ""
    return f"{m:.3g} ± {sd:.2g} (n={n})"


def overlap_k(report: Mapping[str, Any]) -> int:
    """k for overlap claims: C − 1 (the outlier count), capped by the report's k (≥ 1)."""
    models = report.get("models") or []
    expected = int(models[0]["expected_outliers"]) if models else 1
    return max(1, min(expected, int(report["meta"]["k"])))


def _pair_overlaps(report: Mapping[str, Any], layer: str, field: str, k: int) -> list[float]:
    return [p[field][min(k, len(p[field])) - 1] for p in report.get("pairs", [])
            if p["layer"] == layer and p["group"] != "bn-vs-no-bn" and p.get(field)]


def _model_values(report: Mapping[str, Any], layer: str, fn) -> list[float]:
    out = []
    for m in report.get("models", []):
        lay = m["layers"].get(layer)
        if lay is not None:
            v = fn(lay)
            if v is not None:
                out.append(v)
    return out


def layer_measurements(report: Mapping[str, Any]) -> dict[str, dict[str, tuple]]:
    """Per layer: the (mean, sd, n) of every measured quantity of one structure report."""
    k = overlap_k(report)
    out: dict[str, dict[str, tuple]] = {}
    for layer in report["meta"]["layers"]:
        lays = [m["layers"][layer] for m in report["models"] if layer in m["layers"]]
        dim = lays[0]["dim"] if lays else None
        kk = min([k] + [len(x["overlap_exact_kfac"]) for x in lays])
        out[layer] = {
            "dim": (dim, 0.0, 1),
            "k": (kk, 0.0, 1),
            "random": (kk / dim if dim else None, 0.0, 1),
            "overlap_exact": mean_sd(_pair_overlaps(report, layer, "exact", kk)),
            "overlap_kfac": mean_sd(_pair_overlaps(report, layer, "kfac", kk)),
            "rank1": mean_sd(_model_values(report, layer, lambda x: x["rank1"][0])),
            "alignment": mean_sd(_model_values(report, layer, lambda x: x["align_A_mean"])),
            "outliers": mean_sd(_model_values(report, layer, lambda x: x["outliers_exact"])),
            "expected_outliers": (report["models"][0]["expected_outliers"], 0.0, 1),
            "exact_kfac": mean_sd(_model_values(
                report, layer, lambda x, kk=kk: x["overlap_exact_kfac"][kk - 1]
                if len(x["overlap_exact_kfac"]) >= kk else None)),
            "rel_frobenius": mean_sd(_model_values(report, layer,
                                                   lambda x: x.get("rel_frobenius"))),
        }
    return out


def _verdict_overlap(m, random) -> str:
    if m[0] is None or m[2] < 1:
        return "n/a (needs two seeds)"
    if m[0] >= 0.5:
        return "reproduced"
    if random is not None and m[0] >= 10 * random:
        return "partly (above chance, below 0.5)"
    return "not reproduced"


def _separated(a, b) -> int:
    """+1 if mean a > mean b by more than 2 standard errors of the difference, −1 if below,
    0 otherwise (or when either side has no values)."""
    if a[0] is None or b[0] is None:
        return 0
    se = math.sqrt((a[1] ** 2) / max(a[2], 1) + (b[1] ** 2) / max(b[2], 1))
    diff = a[0] - b[0]
    if abs(diff) > 2 * se and diff != 0:
        return 1 if diff > 0 else -1
    return 0


def claim_rows(cells: Mapping[tuple[str, bool, int], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows (claim, arch, layer, measurement without / with BN, verdict) from structure reports
    keyed by (arch, bn, n_examples). The largest sample size is the one measured; the smallest
    is used for the stability row."""
    rows: list[dict[str, Any]] = []
    archs = sorted({a for a, _, _ in cells}, key=lambda a: [c[0] for c in cells].index(a))
    for arch in archs:
        sizes = {bn: sorted(n for a, b, n in cells if a == arch and b == bn) for bn in (False,
                                                                                         True)}
        meas = {bn: layer_measurements(cells[(arch, bn, sizes[bn][-1])])
                for bn in (False, True) if sizes[bn]}
        small = {bn: layer_measurements(cells[(arch, bn, sizes[bn][0])])
                 for bn in (False, True) if len(sizes[bn]) > 1}
        layers = list(next(iter(meas.values())).keys()) if meas else []
        for layer in layers:
            no, yes = meas.get(False, {}).get(layer), meas.get(True, {}).get(layer)
            rows += _layer_claims(arch, layer, no, yes,
                                  small.get(False, {}).get(layer), small.get(True, {}).get(layer),
                                  sizes)
    return rows


def _row(claim: str, arch: str, layer: str, no: str, bn: str, verdict: str,
         note: str = "") -> dict[str, Any]:
    return {"claim": claim, "statement": CLAIMS[claim], "arch": arch, "layer": layer,
            "no BN": no, "BN": bn, "verdict": verdict, "note": note}


def _layer_claims(arch, layer, no, yes, no_small, yes_small, sizes) -> list[dict[str, Any]]:
    rows = []

    def cell(m, key):
        return fmt_spread(*m[key]) if m is not None else ""

    def verdicts(fn):
        return "; ".join(f"{side}: {fn(m)}" for side, m in (("no BN", no), ("BN", yes))
                         if m is not None)

    ref = no or yes
    k = ref["k"][0]
    rnd = ref["random"][0]
    note = f"k = {k}, random k/p = {rnd:.2g}" if rnd is not None else f"k = {k}"
    rows.append(_row("overlap", arch, layer, cell(no, "overlap_exact"), cell(yes, "overlap_exact"),
                     verdicts(lambda m: _verdict_overlap(m["overlap_exact"], rnd)),
                     note + "; exact blocks, seed pairs"))
    rows.append(_row("overlap", arch, layer + " (K-FAC)", cell(no, "overlap_kfac"),
                     cell(yes, "overlap_kfac"),
                     verdicts(lambda m: _verdict_overlap(m["overlap_kfac"], rnd)),
                     note + "; G ⊗ Ã eigenvectors, seed pairs"))
    if no is not None and yes is not None:
        s = _separated(no["overlap_exact"], yes["overlap_exact"])
        v = {1: "reproduced", -1: "reversed (BN overlaps more)", 0: "no clear difference"}[s]
        rows.append(_row("bn_overlap", arch, layer, cell(no, "overlap_exact"),
                         cell(yes, "overlap_exact"), v, "difference against 2 standard errors"))
    rows.append(_row("rank1", arch, layer, cell(no, "rank1"), cell(yes, "rank1"),
                     verdicts(lambda m: "n/a" if m["rank1"][0] is None else (
                         "reproduced" if m["rank1"][0] >= 0.8 else
                         "partly" if m["rank1"][0] >= 0.5 else "not reproduced")),
                     "σ₁²/Σσᵢ² of the top exact eigenvector, per network"))
    al = verdicts(lambda m: "n/a" if m["alignment"][0] is None else (
        "aligned" if m["alignment"][0] >= 0.9 else "not aligned"))
    if no is not None and yes is not None and no["alignment"][0] is not None:
        broken = _separated(no["alignment"], yes["alignment"]) == 1
        al += "; BN lowers it" if broken else "; BN does not lower it clearly"
    rows.append(_row("alignment", arch, layer, cell(no, "alignment"), cell(yes, "alignment"), al,
                     "|cos(v₁(Ã), E[ã])|, per network"))
    exp = ref["expected_outliers"][0]
    rows.append(_row("outliers", arch, layer, cell(no, "outliers"), cell(yes, "outliers"),
                     verdicts(lambda m: "n/a" if m["outliers"][0] is None else (
                         "reproduced" if abs(m["outliers"][0] - exp) <= 1 else
                         "not reproduced")), f"C − 1 = {exp}; largest-gap rule"))

    def kfac_verdict(m):
        ov, fr = m["exact_kfac"][0], m["rel_frobenius"][0]
        if ov is None:
            return "n/a"
        good = [ov >= 0.5] + ([fr <= 0.5] if fr is not None else [])
        return "reproduced" if all(good) else "partly" if any(good) else "not reproduced"

    def both(m):
        if m is None:
            return ""
        return (f"overlap {fmt_spread(*m['exact_kfac'])}; rel. Frobenius "
                f"{fmt_spread(*m['rel_frobenius'])}")

    rows.append(_row("kfac", arch, layer, both(no), both(yes), verdicts(kfac_verdict),
                     f"exact vs K-FAC top-{k} overlap, ‖H − G⊗Ã‖_F/‖H‖_F; per network"))
    cols, words = {}, []
    for side, big, small_m, bn in (("no BN", no, no_small, False), ("BN", yes, yes_small, True)):
        if big is None or small_m is None or None in (big["overlap_exact"][0],
                                                      small_m["overlap_exact"][0]):
            continue
        a, b = small_m["overlap_exact"][0], big["overlap_exact"][0]
        cols[side] = f"{a:.3g} (n={sizes[bn][0]}) → {b:.3g} (n={sizes[bn][-1]})"
        words.append(f"{side}: {'stable' if abs(b - a) <= 0.1 else 'not stable'}")
    if cols:
        rows.append(_row("stability", arch, layer, cols.get("no BN", ""), cols.get("BN", ""),
                         "; ".join(words), "exact overlap across seeds at two sample sizes"))
    return rows


def claim_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (claim, arch): how many layers each verdict word got, over both BN sides."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["claim"], r["arch"])
        row = out.setdefault(key, {"claim": r["claim"], "statement": r["statement"],
                                   "arch": r["arch"], "verdicts": {}})
        for part in str(r["verdict"]).split(";"):
            word = part.split(":")[-1].strip().split(" (")[0]
            if word:
                row["verdicts"][word] = row["verdicts"].get(word, 0) + 1
    for row in out.values():
        row["verdicts"] = ", ".join(f"{w}: {c}" for w, c in sorted(row["verdicts"].items()))
    return list(out.values())
