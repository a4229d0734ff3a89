"""The built-in job kinds wired to the real analyses, on a tiny grid (inline executor).

Each record is checked against an independent computation: the train job's errors against the
checkpoint evaluated here, the curvature job's top eigenvalue against the dense eigenvalues of
torch.kron(G, A) from its saved factors, the bound job's numbers against its own certificate
recomputed from its terms, the structure job's overlap against ‖V₁ᵀV₂‖²_F/k of the per-model
eigenvalue-sorted bases in its full report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kfacbound.batch import latest_records, parse_spec, run_batch

SPEC = """
name = "real-tiny"
seeds = [0, 1]
bn = [false, true]
[[datasets]]
name = "digits"
subset = 120
[[architectures]]
arch = "fc"
widths = [4]
[train]
epochs = 5
lr = 0.1
[[analyses]]
kind = "curvature"
[[analyses]]
kind = "bound"
iterations = 10
mc_passes = 1
[[analyses]]
kind = "bound"
recipe = "best"
prior_epochs = 1
iterations = 5
mc_passes = 1
[[analyses]]
kind = "structure"
k = 3
max_examples = 60
[[analyses]]
kind = "spectra"
k = 3
max_examples = 60
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    spec = parse_spec(SPEC)
    out = tmp_path_factory.mktemp("real")
    outcome = run_batch(spec, out, executor="inline", threads=1, progress=False)
    return spec, out, outcome


def test_spec_fills_analysis_defaults():
    spec = parse_spec(SPEC)
    bound = next(j for j in spec.jobs if j.kind == "bound")
    # certify_checkpoint's defaults are part of the config (and so of the key)
    assert bound.config["options"]["delta"] == 0.025 and bound.config["options"]["iterations"] == 10
    with pytest.raises(Exception, match="unknown option.*'iteration'"):
        parse_spec(SPEC.replace("iterations = 10", "iteration = 10"))
    with pytest.raises(Exception, match="unknown option.*'kk'"):
        parse_spec(SPEC.replace("k = 3\nmax_examples", "kk = 3\nmax_examples"))


def test_real_jobs_all_ok(finished):
    spec, out, outcome = finished
    recs = latest_records(out / "results.jsonl")
    assert not outcome.all_failed, [recs[k]["error"] for k in outcome.all_failed]
    kinds = sorted(j.kind for j in spec.jobs)
    assert kinds.count("train") == 4 and kinds.count("structure") == 2
    assert all(r["status"] == "ok" for r in recs.values())


def test_train_record_matches_checkpoint(finished):
    from kfacbound.checkpoint import load_checkpoint
    from kfacbound.data import load_dataset
    from kfacbound.losses import zero_one_errors

    spec, out, _ = finished
    recs = latest_records(out / "results.jsonl")
    for job in (j for j in spec.jobs if j.kind == "train"):
        res = recs[job.key]["result"]
        ckpt = load_checkpoint(out / res["checkpoint"])
        assert ckpt.spec["bn"] == job.config["bn"]
        for split in ("train", "test"):
            ds = load_dataset("digits", split, subset=120)
            with torch.no_grad():
                wrong = int(zero_one_errors(ckpt.model(ds.tensors[0]), ds.tensors[1]).sum())
            assert res[f"{split}_error"] == pytest.approx(wrong / len(ds), abs=1e-12)


def test_curvature_record_matches_dense_kron(finished):
    from safetensors.torch import load_file

    spec, out, _ = finished
    recs = latest_records(out / "results.jsonl")
    for job in (j for j in spec.jobs if j.kind == "curvature"):
        res = recs[job.key]["result"]
        tensors = load_file(str(out / res["factors"]))
        for layer, values in res["layers"].items():
            K = torch.kron(tensors[f"{layer}.G"], tensors[f"{layer}.A"]).double().numpy()
            lam = np.linalg.eigvalsh(K)  # dense, independent of the factor-wise eigenvalues
            assert values["top_eigenvalue"] == pytest.approx(float(lam[-1]), rel=1e-8)
            assert values["trace"] == pytest.approx(float(lam.sum()), rel=1e-8)
            assert values["dim"] == K.shape[0]


def test_bound_record_matches_certificate(finished):
    from kfacbound.bounds import recompute_certificate

    spec, out, _ = finished
    recs = latest_records(out / "results.jsonl")
    for job in (j for j in spec.jobs if j.kind == "bound"):
        res = recs[job.key]["result"]
        cert = json.loads((out / res["certificate"]).read_text())
        assert res["bound"] == pytest.approx(recompute_certificate(cert), rel=1e-9)
        assert (res["kl"], res["snn_train_error"], res["n"]) == (
            cert["kl"], cert["mc_error"], cert["n"])
        split = job.config["options"]["prior_split"]
        assert cert["n"] == (120 if split is None else 60) and 0 < res["bound"] <= 1
        if isinstance(job.config["options"]["posterior"], list):  # recipe best: a selection
            sel = cert["selection"]
            assert sel["m"] == 2 and res["posterior"] in ("diag", "kfac")
            assert res["bound"] == min(c["bound"] for c in sel["candidates"])


def test_structure_record_matches_report(finished):
    spec, out, _ = finished
    recs = latest_records(out / "results.jsonl")
    for job in (j for j in spec.jobs if j.kind == "structure"):
        res = recs[job.key]["result"]
        report = json.loads((out / res["report"]).read_text())
        assert [m["label"] for m in report["models"]] == ["seed0", "seed1"]
        assert {m["bn"] for m in report["models"]} == {job.config["bn"]}
        for layer, values in res["layers"].items():
            pair = next(p for p in report["pairs"] if p["layer"] == layer)
            assert values["overlap"] == pytest.approx(pair["exact"][values["k"] - 1])
            tops = [m["layers"][layer]["exact_eigenvalues"][0] for m in report["models"]]
            assert values["top_eigenvalue"] == pytest.approx(sum(tops) / 2)
            assert 0 <= values["overlap"] <= 1 + 1e-9


def test_spectra_and_compare_on_real_batch(finished, tmp_path):
    from kfacbound.batch.compare import compare_batch

    spec, out, _ = finished
    recs = latest_records(out / "results.jsonl")
    for job in (j for j in spec.jobs if j.kind == "spectra"):
        res = recs[job.key]["result"]
        full = json.loads((out / res["report"]).read_text())
        for row in full["rows"]:
            assert res["layers"][row["layer"]]["top_eigenvalue"] == row["top"]
    report = compare_batch(out, tmp_path / "r").read_text()
    assert "| digits | fc-4 | fc1 |" in report
    # two bound analyses (the plain one and recipe best): one mean row per variant
    assert report.count("| digits | fc-4 | ") >= 2 and report.count(" | mean |") >= 2


def test_study_page_aggregates_the_records(finished, tmp_path):
    """The study page's tables against the records and artifacts, aggregated here."""
    from kfacbound.batch.study import study_page

    _, out, _ = finished
    page = study_page(out, tmp_path / "study")
    text = page.read_text()
    for section in ("1. Training", "2. Certified bounds", "3. Per-layer KL",
                    "4. Dissecting-Hessian claims", "5. Cost"):
        assert section in text
    data = json.loads((tmp_path / "study" / "study.json").read_text())
    recs = [r for r in latest_records(out / "results.jsonl").values() if r["kind"] == "bound"
            and r["config"]["options"]["prior_split"] is None]  # the data-free analysis
    for bn, side in ((False, "no BN"), (True, "BN")):
        mine = [r["result"] for r in recs if r["config"]["bn"] == bn]
        vals = [x["bound"] for x in mine]
        row = next(r for r in data["bounds"] if r["BN"] == side
                   and r["prior"] == "data-free (w0; Q from |w|, 10 steps)")
        assert row["seeds"] == len(vals) == 2
        m, sd = np.mean(vals), np.std(vals, ddof=1)
        assert row["bound"] == f"{m:.3g} ± {sd:.2g} (n=2)"
        for x in mine:  # the per-layer KLs of a record add up to its KL
            assert sum(v["kl"] for v in x["layers"].values()) == pytest.approx(x["kl"], rel=1e-9)
    assert "3b. What the KL is made of" in text and data["kl_anatomy"]
    for row in data["kl_anatomy"]:  # the KL rebuilt from the certificates' terms = the records'
        match = next(r for r in data["bounds"] if all(r[c] == row[c] for c in
                                                     ("arch", "posterior", "prior", "BN")))
        assert row["KL"] == match["KL"] and row["seeds"] == match["seeds"]
    best = [r for r in data["bounds"] if r["posterior"] == "tighter of diag / kfac"]
    assert {r["prior"] for r in best} == {
        "learnt (0.5, pbb, 1 ep, dropout 0.2; Q from σ₀ = 0.002, 5 steps)"} and len(best) == 2
    assert not any("settings tried" in k for r in data["bounds"] for k in r)  # trials = 1
    claims = {r["claim"] for r in data["claims"]}
    assert {"overlap", "rank1", "alignment", "outliers", "kfac", "bn_overlap"} <= claims
    assert (tmp_path / "study" / "study_overlap.png").exists()
    assert (tmp_path / "study" / "study_training.png").exists()


def test_study_page_pays_for_the_recipe_trials(finished, tmp_path):
    """With recipe_trials = K every row gets the union-bounded column: per seed the certificate
    recomputed at (δ/(m·K), δ′/(m·K)) (kl_inv by brentq here), no tighter than the bound; a
    certificate file that is gone is left out and named."""
    from kfacbound.batch.study import study_page
    from kfacbound.bounds.pacbayes import complexity, mc_error_bound

    from .test_certify import brentq_kl_inv

    _, out, _ = finished
    study_page(out, tmp_path / "study", trials=50)
    data = json.loads((tmp_path / "study" / "study.json").read_text())
    col = "bound, 50 settings tried"
    recs = [r for r in latest_records(out / "results.jsonl").values() if r["kind"] == "bound"]
    for bn, side in ((False, "no BN"), (True, "BN")):
        for learnt, match in ((True, "tighter of diag / kfac"), (False, "data-free")):
            mine = [r for r in recs if r["config"]["bn"] == bn
                    and (r["config"]["options"].get("prior_split") is not None) == learnt]
            paid = []
            for r in mine:
                cert = json.loads((out / r["result"]["certificate"]).read_text())
                m = 50 * ((cert.get("selection") or {}).get("m") or 1)
                ub = mc_error_bound(cert["mc_error"], cert["mc_samples"], cert["delta_prime"] / m)
                B = complexity(cert["kl"], cert["n"], cert["delta"] / m, cert["formula"],
                               cert["grid_penalty"])  # 2 ln j of its λ grid point
                paid.append(brentq_kl_inv(ub, B))
                assert paid[-1] >= r["result"]["bound"]
            row = next(r for r in data["bounds"] if r["BN"] == side
                       and (r["posterior"] if learnt else r["prior"]).startswith(match))
            mean, rest = row[col].split(" ± ")
            assert float(mean) == pytest.approx(np.mean(paid), rel=5e-3) and rest.endswith(
                "(n=2)")
    # a lost certificate file: left out of the column and named, the page still written
    gone = next(r for r in recs if r["config"]["options"].get("prior_split") is None)
    path = out / gone["result"]["certificate"]
    saved = path.read_bytes()
    path.unlink()
    try:
        study_page(out, tmp_path / "study2", trials=50)
    finally:
        path.write_bytes(saved)
    rows = json.loads((tmp_path / "study2" / "study.json").read_text())["bounds"]
    assert sum("missing" in r.get("trials_note", "") for r in rows) == 1
