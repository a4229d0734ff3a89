"""The BatchNorm study page (issue 13): one page a researcher reads, from a batch directory.

Built from the batch's records, its artifacts (certificates, structure reports) and its
checkpoints (training histories), nothing else; sections:

1. **Training** per (architecture, BN): epochs, train / test error as mean ± sd over seeds, and
   the plateau evidence: the relative change of the training loss over the last 5 epochs.
2. **Certified bounds** per (architecture, posterior, BN): bound, KL, SNN error on the bound
   set, SNN and deterministic test error, seconds per certificate, mean ± sd over seeds.
3. **Per-layer KL** (the mechanism): each layer's KL(Q‖P) share, BN against no BN, per
   posterior; from the certificates' ``kl_layers`` (which :func:`recompute_certificate` checks);
   then (3b) what the KL is made of: the distance and variance parts and the KL the same Q would
   have with one prior variance per layer (:func:`kfacbound.bounds.certificate.kl_anatomy`).
4. **Structure claims** (:mod:`kfacbound.analysis.claims`): the paper's claim, our measurement
   with seed spread, verdict; a summary table counting verdicts per claim and architecture.
5. **Figures**: bounds and KL per variant, per-layer KL, overlap against k (exact and K-FAC, BN
   and no BN, with the random baseline), training curves.
6. **Cost**: CPU and wall seconds per job kind and architecture, summed from the records.

Cells still running or not started are listed, so a page of a partial study says what it lacks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..analysis.claims import claim_rows, claim_summary, fmt_spread, mean_sd
from ..errors import KfacboundError
from ..io import write_csv_atomic, write_json_atomic, write_text_atomic
from .report import batch_info, batch_records, markdown_table

PLATEAU_EPOCHS = 5


def _label(record: dict[str, Any]) -> str:
    return str((record["config"].get("label") or {}).get("arch"))


def _ok(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind and r["status"] == "ok"]


def _order(records: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if _label(r) not in seen:
            seen.append(_label(r))
    return seen


def _bn(flag: Any) -> str:
    return "BN" if flag else "no BN"


def _spread(values: list[Any]) -> str:
    return fmt_spread(*mean_sd(values))


# ----------------------------------------------------------------------------- training


def _history(batch_dir: Path, record: dict[str, Any]) -> list[float]:
    """The per-epoch training losses stored in the record's checkpoint (empty if absent)."""
    rel = (record.get("result") or {}).get("checkpoint")
    if not rel or not (batch_dir / rel).exists():
        return []
    from ..checkpoint import load_checkpoint

    try:
        meta = load_checkpoint(batch_dir / rel).meta
    except KfacboundError:  # not a readable checkpoint (e.g. a plug-in train kind's file)
        return []
    hist = (meta.get("metrics") or {}).get("history") or []
    return [float(h["train_loss"]) for h in hist]


def training_rows(records: list[dict[str, Any]], batch_dir: Path
                  ) -> tuple[list[dict[str, Any]], dict[tuple[str, bool], list[list[float]]]]:
    """(rows per (arch, BN), training-loss curves per (arch, BN))."""
    curves: dict[tuple[str, bool], list[list[float]]] = {}
    cells: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for r in _ok(records, "train"):
        key = (_label(r), bool(r["config"]["bn"]))
        cells.setdefault(key, []).append(r)
        h = _history(batch_dir, r)
        if h:
            curves.setdefault(key, []).append(h)
    rows = []
    for (arch, bn), rs in cells.items():
        changes = []
        for h in curves.get((arch, bn), []):
            if len(h) > PLATEAU_EPOCHS and h[-PLATEAU_EPOCHS - 1] > 0:
                changes.append((h[-1] - h[-PLATEAU_EPOCHS - 1]) / h[-PLATEAU_EPOCHS - 1])
        res = [r["result"] for r in rs]
        rows.append({
            "arch": arch, "BN": _bn(bn), "seeds": len(rs),
            "epochs": rs[0]["config"]["options"].get("epochs"),
            "schedule": rs[0]["config"]["options"].get("schedule", "constant"),
            "params": res[0].get("params"),
            "train error": _spread([x.get("train_error") for x in res]),
            "test error": _spread([x.get("test_error") for x in res]),
            f"train-loss change, last {PLATEAU_EPOCHS} epochs": _spread(changes),
            "final train loss": _spread([x.get("final_train_loss") for x in res]),
        })
    return rows, curves


# ----------------------------------------------------------------------------- bounds

BOUND_FIELDS = [("bound", "bound"), ("kl", "KL"), ("snn_train_error", "SNN error (bound set)"),
                ("snn_test_error", "SNN test error"), ("test_error", "test error"),
                ("seconds", "seconds")]


def _prior(options: dict[str, Any]) -> str:
    """The prior of a bound job and how Q was fitted, as the tables name them, e.g. "learnt (0.5,
    pbb, 30 ep, dropout 0.2; Q from σ₀ = 0.002, 500 steps)": enough to tell two recipes apart."""
    split = options.get("prior_split")
    std = options.get("std_init", "dr")
    start = {"dr": "|w|"}.get(std, std) if isinstance(std, str) else f"σ₀ = {std:g}"
    fit = f"Q from {start}, {options.get('iterations')} steps"
    if split is None:
        return f"data-free (w0; {fit})"
    dropout = options.get("prior_dropout") or 0
    return (f"learnt ({split:g}, {options.get('prior_scheme', 'pbb')}, "
            f"{options.get('prior_epochs')} ep{f', dropout {dropout:g}' if dropout else ''}; "
            f"{fit})")


def _short_prior(options: dict[str, Any]) -> str:
    """"learnt, 500 st": the kind of prior and the posterior steps, for figure labels."""
    kind = "data-free" if options.get("prior_split") is None else "learnt"
    return f"{kind}, {options.get('iterations')} st"


def _variant(r: dict[str, Any]) -> tuple[str, str]:
    options = r["config"]["options"]
    post = options.get("posterior")
    name = f"tighter of {' / '.join(map(str, post))}" if isinstance(post, list) else str(post)
    return name, _prior(options)


def _certificate(batch_dir: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The certificate JSON a bound record points to in ``batch_dir``, or None without one."""
    rel = (record.get("result") or {}).get("certificate")
    path = batch_dir / rel if rel else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def trials_column(trials: int) -> str:
    return f"bound, {trials} settings tried"


def bound_table(records: list[dict[str, Any]], batch_dir: Path | None = None,
                trials: int = 1) -> list[dict[str, Any]]:
    """Rows per (arch, posterior, prior, BN): mean ± sd over seeds of each certificate field.

    ``trials`` > 1 (the spec's ``recipe_trials``: the recipes were chosen among that many
    settings certified on the same training data) adds the column :func:`trials_column`: each
    certificate's bound under the union bound over the settings,
    :func:`kfacbound.bounds.certificate.bound_after_trials`, recomputed from the certificate
    file in ``batch_dir`` (data-free rows too: their optimiser settings are among the settings
    tried). A certificate file that is missing or does not recompute is left out of that
    column, and the row's ``trials_note`` says how many were."""
    from ..bounds.certificate import bound_after_trials

    cells: dict[tuple[str, str, str, bool], list[dict[str, Any]]] = {}
    short: dict[tuple[str, str, str, bool], str] = {}
    paid: dict[tuple[str, str, str, bool], list[float]] = {}
    missed: dict[tuple[str, str, str, bool], int] = {}
    for r in _ok(records, "bound"):
        key = (_label(r), *_variant(r), bool(r["config"]["bn"]))
        cells.setdefault(key, []).append(r["result"])
        short[key] = _short_prior(r["config"]["options"])
        if trials > 1 and batch_dir is not None:
            try:
                cert = _certificate(batch_dir, r)
                if cert is None:
                    raise FileNotFoundError(r["key"])
                paid.setdefault(key, []).append(bound_after_trials(cert, trials))
            except (OSError, ValueError, KeyError, KfacboundError):
                missed[key] = missed.get(key, 0) + 1
    rows = []
    for (arch, post, prior, bn), res in cells.items():
        row: dict[str, Any] = {"arch": arch, "posterior": post, "prior": prior, "BN": _bn(bn),
                               "seeds": len(res), "n": res[0].get("n"),
                               "_short_prior": short[(arch, post, prior, bn)]}
        for field, name in BOUND_FIELDS:
            row[name] = _spread([x.get(field) for x in res])
            if field == "bound" and trials > 1:
                key = (arch, post, prior, bn)
                row[trials_column(trials)] = _spread(paid.get(key, []))
                if missed.get(key):
                    row["trials_note"] = f"{missed[key]} certificate(s) missing or not recomputable"
        row["_mean_bound"] = mean_sd([x.get("bound") for x in res])[0]
        row["_mean_kl"] = mean_sd([x.get("kl") for x in res])[0]
        rows.append(row)
    return rows


def layer_kl_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows per (arch, posterior, layer): KL of the layer (mean ± sd over seeds) and its share of
    the total KL, without and with BN."""
    cells: dict[tuple[str, str, str, str], dict[str, dict[str, list[float]]]] = {}
    for r in _ok(records, "bound"):
        res = r["result"]
        layers = res.get("layers") or {}
        total = res.get("kl")
        for layer, v in layers.items():
            key = (_label(r), *_variant(r), layer)
            side = cells.setdefault(key, {}).setdefault(_bn(r["config"]["bn"]),
                                                        {"kl": [], "share": [], "k": []})
            side["kl"].append(v["kl"])
            side["k"].append(v["k"])
            if total:
                side["share"].append(v["kl"] / total)
    rows = []
    for (arch, post, prior, layer), sides in cells.items():
        row: dict[str, Any] = {"arch": arch, "posterior": post, "prior": prior, "layer": layer}
        for side in ("no BN", "BN"):
            s = sides.get(side)
            row[f"KL ({side})"] = _spread(s["kl"]) if s else ""
            row[f"share ({side})"] = (f"{mean_sd(s['share'])[0]:.1%}" if s and s["share"]
                                      else "")
            row[f"KL per parameter ({side})"] = (
                f"{mean_sd(s['kl'])[0] / s['k'][0]:.3g}" if s and s["k"][0] else "")
            row[f"_kl ({side})"] = mean_sd(s["kl"])[0] if s else None
        rows.append(row)
    return rows


def kl_anatomy_rows(records: list[dict[str, Any]], batch_dir: Path) -> list[dict[str, Any]]:
    """Rows per (arch, posterior, prior, BN), mean ± sd over seeds, of what each certificate's KL
    is made of (:func:`kfacbound.bounds.certificate.kl_anatomy`, read from the certificate files
    in ``artifacts/``): the distance part ‖μ − w0‖²/2λ, the variance part, λ, ‖μ − w0‖², the mean
    posterior variance tr Σ/k, and the KL of the same Q with one prior variance per layer."""
    from ..bounds.certificate import kl_anatomy

    cells: dict[tuple[str, str, str, bool], list[dict[str, float]]] = {}
    for r in _ok(records, "bound"):
        cert = _certificate(batch_dir, r)
        if cert is None:
            continue
        a = kl_anatomy(cert)
        if a is None:
            continue
        t = cert["kl_terms"]
        cells.setdefault((_label(r), *_variant(r), bool(r["config"]["bn"])), []).append({
            **a, "sq_dist": float(t["sq_dist"]), "mean_var": float(t["trace_sigma"]) / t["k"]})
    rows = []
    for (arch, post, prior, bn), xs in cells.items():
        col = {key: [x[key] for x in xs] for key in xs[0]}
        kl, dist, star = (mean_sd(col[key])[0] for key in ("kl", "distance", "kl_layer_lambda"))
        rows.append({"arch": arch, "posterior": post, "prior": prior, "BN": _bn(bn),
                     "seeds": len(xs), "KL": _spread(col["kl"]),
                     "distance ‖μ−w0‖²/2λ": _spread(col["distance"]),
                     "distance share": f"{dist / kl:.0%}" if kl else "",
                     "variance part": _spread(col["variance"]), "λ": _spread(col["lambda"]),
                     "‖μ−w0‖²": _spread(col["sq_dist"]), "tr Σ / k": _spread(col["mean_var"]),
                     "KL, one λ per layer (same Q)": _spread(col["kl_layer_lambda"]),
                     "saved by per-layer λ": f"{1 - star / kl:.1%}" if kl else ""})
    return rows


# ----------------------------------------------------------------------------- structure


def structure_cells(records: list[dict[str, Any]], batch_dir: Path
                    ) -> dict[tuple[str, bool, int], dict[str, Any]]:
    """Structure reports keyed by (arch, bn, number of examples)."""
    cells = {}
    for r in _ok(records, "structure"):
        rel = (r.get("result") or {}).get("report")
        if not rel or not (batch_dir / rel).exists():
            continue
        report = json.loads((batch_dir / rel).read_text())
        cells[(_label(r), bool(r["config"]["bn"]), int(report["meta"]["n"]))] = report
    return cells


# ----------------------------------------------------------------------------- figures


def _plot_bounds(rows: list[dict[str, Any]], path: Path) -> Path | None:
    from ..analysis.plots import save_figure, subplots_grid

    rows = [r for r in rows if r["_mean_bound"] is not None]
    if not rows:
        return None
    fig, (ax_b, ax_k) = subplots_grid(2, ncols=2, size=(6.0, 3.6))
    groups = list(dict.fromkeys((r["arch"], r["posterior"], r["prior"]) for r in rows))
    short = {(r["arch"], r["posterior"], r["prior"]): r["_short_prior"] for r in rows}
    for ax, field, ylabel, log in ((ax_b, "_mean_bound", "certified bound (mean over seeds)",
                                    False), (ax_k, "_mean_kl", "KL(Q‖P) (mean)", True)):
        for j, side in enumerate(("no BN", "BN")):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(groups))]
            ys = [next((r[field] for r in rows if (r["arch"], r["posterior"], r["prior"]) == g
                        and r["BN"] == side), math.nan) for g in groups]
            ax.bar(xs, ys, width=0.38, label=side)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{a}\n{p.replace('tighter of ', '')}\n{short[a, p, q]}"
                            for a, p, q in groups], fontsize=6)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    return save_figure(fig, path, "Certified bounds and KL, with and without BatchNorm")


def _plot_layer_kl(rows: list[dict[str, Any]], path: Path, posterior: str = "diag"
                   ) -> Path | None:
    from ..analysis.plots import save_figure, subplots_grid

    rows = [r for r in rows if r["posterior"] == posterior and r["prior"].startswith("learnt")]
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    if not archs:
        return None
    fig, axes = subplots_grid(len(archs), ncols=3, size=(5.0, 3.4))
    for ax, arch in zip(axes, archs, strict=True):
        mine = [r for r in rows if r["arch"] == arch]
        for j, side in enumerate(("no BN", "BN")):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(mine))]
            ax.bar(xs, [r[f"_kl ({side})"] or math.nan for r in mine], width=0.38, label=side)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([r["layer"] for r in mine], rotation=60, fontsize=6)
        ax.set_yscale("log")
        ax.set_title(arch, fontsize=9)
        ax.set_ylabel("KL of the layer (nats)")
        ax.legend(fontsize=7)
    return save_figure(fig, path, f"Per-layer KL(Q‖P), {posterior} posterior, learnt prior")


def _plot_overlap(cells: dict[tuple[str, bool, int], dict[str, Any]], path: Path
                  ) -> Path | None:
    import numpy as np

    from ..analysis.plots import save_figure, subplots_grid

    panels = []
    for arch in dict.fromkeys(a for a, _, _ in cells):
        n_max = max(n for a, _, n in cells if a == arch)
        any_rep = next(rep for (a, _, n), rep in cells.items() if a == arch and n == n_max)
        for layer in any_rep["meta"]["layers"]:
            panels.append((arch, layer, n_max))
    if not panels:
        return None
    fig, axes = subplots_grid(len(panels), ncols=5, size=(3.3, 2.6))
    for ax, (arch, layer, n) in zip(axes, panels, strict=True):
        for bn, color in ((False, "C0"), (True, "C1")):
            rep = cells.get((arch, bn, n))
            if rep is None:
                continue
            for field, style in (("exact", "-"), ("kfac", "--")):
                curves = [p[field] for p in rep["pairs"] if p["layer"] == layer and p[field]]
                if not curves:
                    continue
                kk = min(len(c) for c in curves)
                mean = np.mean([c[:kk] for c in curves], axis=0)
                ax.plot(range(1, kk + 1), mean, style, color=color,
                        label=f"{_bn(bn)} {'exact' if field == 'exact' else 'K-FAC'}")
            dim = rep["models"][0]["layers"][layer]["dim"]
            kk = int(rep["meta"]["k"])
            ax.plot(range(1, kk + 1), [j / dim for j in range(1, kk + 1)], ":", color="gray")
        ax.set_title(f"{arch} {layer}", fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=5)
    return save_figure(fig, path, "Top-k eigenspace overlap across seeds (dotted: random k/p)")


def _plot_training(curves: dict[tuple[str, bool], list[list[float]]], path: Path) -> Path | None:
    from ..analysis.plots import save_figure, subplots_grid

    archs = list(dict.fromkeys(a for a, _ in curves))
    if not archs:
        return None
    fig, axes = subplots_grid(len(archs), ncols=3, size=(4.2, 3.0))
    for ax, arch in zip(axes, archs, strict=True):
        for bn, color in ((False, "C0"), (True, "C1")):
            for i, h in enumerate(curves.get((arch, bn), [])):
                ax.plot(range(1, len(h) + 1), h, color=color, alpha=0.7,
                        label=_bn(bn) if i == 0 else None)
        ax.set_yscale("log")
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    return save_figure(fig, path, "Training loss per epoch (every seed)")


# ----------------------------------------------------------------------------- page


def cost_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CPU and wall hours per (job kind, arch), summed over the ok records."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for r in records:
        if r["status"] != "ok":
            continue
        t = r.get("timing") or {}
        c = cells.setdefault((r["kind"], _label(r)), {"jobs": 0, "cpu": 0.0, "wall": 0.0})
        c["jobs"] += 1
        c["cpu"] += float(t.get("cpu_s") or 0.0)
        c["wall"] += float(t.get("wall_s") or 0.0)
    return [{"kind": k, "arch": a, "jobs": v["jobs"], "CPU h": round(v["cpu"] / 3600, 3),
             "wall h": round(v["wall"] / 3600, 3),
             "wall min per job": round(v["wall"] / 60 / max(v["jobs"], 1), 2)}
            for (k, a), v in cells.items()]


def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    rows = _public(rows)
    write_csv_atomic(path, rows, list(dict.fromkeys(c for r in rows for c in r)))


def _table(rows: list[dict[str, Any]], empty: str) -> list[str]:
    rows = _public(rows)
    if not rows:
        return [empty, ""]
    return [markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r))), ""]


def _section(title: str, text: str, rows: list[dict[str, Any]], empty: str,
             figure: str | None) -> list[str]:
    out = [f"## {title}", "", text, ""] + _table(rows, empty)
    if figure:
        out += [f"![{title}]({figure})", ""]
    return out


def study_page(batch_dir: str | Path, report_dir: str | Path, title: str | None = None,
               trials: int | None = None) -> Path:
    """Write ``report_dir/study.md`` (+ ``study_*.csv``, ``study.json`` and ``study_*.png``, beside
    the BatchNorm report's own files); return its path. ``trials``: the number of recipe
    settings tried (:func:`bound_table`); None takes the spec's ``recipe_trials``."""
    batch_dir, out = Path(batch_dir), Path(report_dir)
    if not (batch_dir / "results.jsonl").exists():
        raise KfacboundError(f"{batch_dir} holds no results.jsonl: is it a batch --out directory?")
    out.mkdir(parents=True, exist_ok=True)
    records = batch_records(batch_dir, only_latest_run=False)
    info = batch_info(batch_dir)
    train, curves = training_rows(records, batch_dir)
    if trials is None:
        trials = int(info.get("recipe_trials") or 1)
    bounds = bound_table(records, batch_dir, trials)
    kl_layers = layer_kl_rows(records)
    anatomy = kl_anatomy_rows(records, batch_dir)
    cells = structure_cells(records, batch_dir)
    claims = claim_rows(cells) if cells else []
    summary = claim_summary(claims)
    cost = cost_rows(records)
    tables = {"training": train, "bounds": bounds, "kl_layers": kl_layers,
              "kl_anatomy": anatomy, "claims": claims, "claims_summary": summary, "cost": cost}
    for name, rows in tables.items():
        if rows:
            _write_csv(out / f"study_{name}.csv", rows)
    write_json_atomic(out / "study.json", {name: _public(rows) for name, rows in tables.items()},
                      indent=1)
    figs = {"bounds": _plot_bounds(bounds, out / "study_bounds.png"),
            "kl": _plot_layer_kl(kl_layers, out / "study_kl_layers.png"),
            "overlap": _plot_overlap(cells, out / "study_overlap.png"),
            "training": _plot_training(curves, out / "study_training.png")}
    keys = info.get("keys") or []
    done = {r["key"] for r in records if r["status"] == "ok"}
    failed = [r for r in records if r["status"] == "error"]
    missing = [k for k in keys if k not in done]
    cpu = sum(float((r.get("timing") or {}).get("cpu_s") or 0) for r in records)
    parts = [f"# {title or info.get('name') or 'Batch'}: the BatchNorm study", "",
             f"Source: batch `{batch_dir}`; {len(done)} of {len(keys) or len(records)} jobs "
             f"finished, {len(failed)} failed, {len(missing)} not finished yet; "
             f"{cpu / 3600:.2f} CPU hours so far (sum over the records).", ""]
    if missing:
        parts += ["This page shows a partial study: rerunning the batch command resumes it and "
                  "this page is regenerated from whatever has finished.", ""]
    parts += _section(
        "1. Training (convergence)",
        f"Mean ± sd over seeds. Plateau evidence: the relative change of the training loss over "
        f"the last {PLATEAU_EPOCHS} epochs (near 0: converged under the budget).",
        train, "(no finished training)", figs["training"] and "study_training.png")
    parts += _section(
        "2. Certified bounds",
        "Mean ± sd over seeds; 0-1 error bounds at confidence 1 − δ − δ′ (δ = 0.025, "
        "δ′ = 0.01). BN networks are certified in their deployed form (eval-mode BN folded into "
        "the preceding layer). Every certificate is in `artifacts/` and recomputes from its JSON "
        "(`kfacbound.bounds.certify.recompute_certificate`)."
        + (f" The recipes' settings were chosen among at most {trials} settings "
           f"certified on the same training images, so the bound column alone does not pay "
           f"for that choice; '{trials_column(trials)}' does, with a union bound over them "
           f"(δ/{trials}, δ′/{trials} each, the same confidence; "
           f"`kfacbound.bounds.bound_after_trials`, recomputed from each certificate; the "
           f"data-free rows' optimiser settings are among them too)." if trials > 1 else ""),
        bounds, "(no finished bound jobs)", figs["bounds"] and "study_bounds.png")
    parts += _section(
        "3. Per-layer KL: which layers pay for the bound",
        "KL(Q‖P) = Σ over layers; each layer's KL (mean ± sd over seeds), its share of the "
        "total and KL per parameter, without and with BN.",
        kl_layers, "(no certificates with per-layer KL)", figs["kl"] and "study_kl_layers.png")
    parts += _section(
        "3b. What the KL is made of",
        "For the isotropic prior N(w0, λI): KL = ‖μ − w0‖²/2λ (the distance part: the mean moved "
        "from the prior's) + ½[tr Σ/λ − k + k ln λ − ln det Σ] (the variance part), at the "
        "certified λ. The last columns give the KL of the same posterior if each layer had its "
        "own prior variance λ_l = (tr Σ_l + ‖μ_l − w0_l‖²)/k_l (no grid penalty: the most that "
        "matching the prior to each layer's scale, e.g. BN's folded scales, could save for this "
        "Q; a diagnostic, not a bound). Computed from the certificates' `kl_layers` "
        "(`kfacbound.bounds.kl_anatomy`).",
        anatomy, "(no isotropic-prior certificates with per-layer terms)", None)
    parts += _section(
        "4. Dissecting-Hessian claims",
        "Verdict rules are fixed in `kfacbound/analysis/claims.py` (module docstring). Overlaps "
        "are between networks trained with different seeds (mean ± sd over seed pairs); "
        "per-network quantities are mean ± sd over networks. Summary first, then per layer.",
        summary, "(no finished structure jobs)", None)
    if claims:
        parts += _table(claims, "")
    if figs["overlap"]:
        parts += ["![overlap](study_overlap.png)", ""]
    parts += ["## 5. Cost", ""] + _table(cost, "(no records)")
    if failed:
        parts += ["## Failed jobs", ""] + [f"- `{r['key'][:12]}` {r['kind']} {_label(r)}: "
                                           f"{str(r.get('error', ''))[:200]}" for r in failed]
        parts.append("")
    parts += ["CSV: " + ", ".join(f"`study_{n}.csv`" for n in tables)
              + "; everything in `study.json`.", ""]
    path = out / "study.md"
    write_text_atomic(path, "\n".join(parts))
    return path
