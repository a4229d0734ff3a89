"""Regenerate results/spectra/: layer Hessian spectra over training (SCIENCE.md §6).

Trains ReLU MLPs (hidden [width] for each of --widths: by default an under-parameterised width 8
and an over-parameterised width 512, which fits its 2,000 training images exactly) with and
without BatchNorm on a Fashion-MNIST subset, saving a checkpoint every --save-every epochs (the
``train --save-every`` series),
then runs :func:`kfacbound.analysis.spectra.spectra_series` on each series: per layer the top
eigenvalue, trace, effective and stable rank, negative mass and fraction, condition number of the
positive part, outliers, and the spectral density (dense eigh for blocks up to --dense-limit,
Lanczos + Hutchinson + stochastic Lanczos quadrature above), next to the train/test error.

Writes <out>/<run>.csv and <run>.json, <run>/metrics.png and <run>/density-<layer>.png,
runs.png (every run's top eigenvalue, effective rank and negative mass against epoch beside its
generalisation gap: the over-/under-fitting signatures side by side), and README.md (tables,
last-epoch signatures, command, date, timings).

Example (defaults: about 20 CPU minutes on 2 cores):
    python scripts/spectra_study.py --out results/spectra
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kfacbound.analysis.plots import plot_densities, plot_spectra_metrics, plot_spectra_runs
from kfacbound.analysis.spectra import spectra_series, write_csv
from kfacbound.checkpoint import atomic_write_text, load_checkpoint
from kfacbound.cli.common import write_json
from kfacbound.data import load_dataset
from kfacbound.train import TrainConfig, train_model


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/spectra")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--widths", default="8,512",
                    help="hidden widths, comma-separated (default: under- and over-parameterised)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--n-curv", type=int, default=100)
    ap.add_argument("--dense-limit", type=int, default=6000,
                    help="blocks up to this many parameters are dense (width 8: both layers; "
                         "width 512: the output layer), larger ones use SLQ")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--slq-probes", type=int, default=4)
    ap.add_argument("--slq-steps", type=int, default=30)
    ap.add_argument("--hutchinson", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    train = load_dataset(args.dataset, subset=args.n_train)
    test = load_dataset(args.dataset, split="test", subset=args.n_test)
    curv = load_dataset(args.dataset, subset=args.n_curv)
    started = time.perf_counter()
    sections, timings, runs = [], {}, {}
    widths = [int(w) for w in args.widths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for width, bn in ((w, b) for w in widths for b in (False, True)):
            run = f"mlp{width}{'-bn' if bn else ''}"
            t0 = time.perf_counter()
            path = Path(tmp) / f"{run}.kfb"
            config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
            train_model({"arch": "fc", "widths": [width], "activation": "relu"}, train,
                        test, config, out=path, save_every=args.save_every, progress=progress,
                        bn=bn)
            series = sorted(Path(tmp).glob(f"{run}-epoch*.kfb"))
            ckpts = [(p.name, c.model, c.meta) for p, c in
                     ((p, load_checkpoint(p)) for p in series)]
            t_train = time.perf_counter() - t0
            res = spectra_series(ckpts, curv, "ce", dense_limit=args.dense_limit, k=args.k,
                                 slq_probes=args.slq_probes, slq_steps=args.slq_steps,
                                 hutchinson_samples=args.hutchinson, dtype=args.dtype,
                                 progress=progress)
            res["meta"].update(run=run, dataset=args.dataset, n_train=args.n_train,
                               epochs=args.epochs, width=width, bn=bn, seed=args.seed)
            runs[run] = res["rows"]
            write_csv(res["rows"], out / f"{run}.csv")
            write_json(out / f"{run}.json", res)
            plot_spectra_metrics(res["rows"], out / run / "metrics.png")
            for layer in dict.fromkeys(r["layer"] for r in res["rows"]):
                plot_densities(res["densities"], out / run / f"density-{layer}.png", layer)
            timings[run] = {"train_s": round(t_train, 1),
                            "spectra_s": round(time.perf_counter() - t0 - t_train, 1)}
            sections.append(_section(run, res["rows"]))
            print(f"{run}: {timings[run]}", file=sys.stderr)
    plot_spectra_runs(runs, out / "runs.png")
    cmd = "python scripts/spectra_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    total = time.perf_counter() - started
    readme = [
        "# Layer Hessian spectra over training", "",
        f"Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `{cmd.strip()}` in "
        f"{total / 60:.1f} min ({args.threads} CPU threads, torch {torch.__version__}).", "",
        f"Data: {args.dataset}, first {args.n_train} training examples; ReLU MLPs hidden "
        f"[w], w in {widths}, with and without BatchNorm, SGD lr {args.lr} momentum 0.9 batch "
        f"100, {args.epochs} epochs, a checkpoint every {args.save_every} epochs; "
        f"curvature = exact layer Hessian block of the mean "
        f"cross-entropy on the first {args.n_curv} training examples ({args.dtype} products). "
        f"Blocks up to {args.dense_limit} parameters: all eigenvalues (eigh), exact metrics; "
        f"larger blocks (method slq): top-{args.k} by Lanczos, trace by Hutchinson "
        f"({args.hutchinson} probes), other metrics from stochastic Lanczos quadrature "
        f"({args.slq_probes} probes x {args.slq_steps} steps; estimates, condition number not "
        "resolvable). Errors are the checkpoints' own train/test 0-1 errors.", "",
        "## Signatures at the last epoch", "",
        "Per run and layer: the generalisation gap (test − train 0-1 error) beside the "
        "curvature diagnostics of the last checkpoint; the figure shows them over training.", "",
        *_signatures(runs),
        "![runs](runs.png)", "",
        *sum(sections, []),
        "Timings: " + json.dumps(timings), "",
    ]
    atomic_write_text(out / "README.md", "\n".join(readme))
    print(f"wrote {out} in {total:.0f} s", file=sys.stderr)


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def _signatures(runs) -> list[str]:
    lines = ["| run | layer | train err | test err | gap | top | eff. rank | neg. mass |",
             "|---|---|---|---|---|---|---|---|"]
    for run, rows in runs.items():
        last = max(r["epoch"] for r in rows)
        for r in (r for r in rows if r["epoch"] == last):
            gap = (None if r.get("test_error") is None or r.get("train_error") is None
                   else r["test_error"] - r["train_error"])
            lines.append(f"| {run} | {r['layer']} | {_fmt(r['train_error'], '.3f')} | "
                         f"{_fmt(r['test_error'], '.3f')} | {_fmt(gap, '.3f')} | "
                         f"{_fmt(r['top'])} | {_fmt(r['effective_rank'])} | "
                         f"{_fmt(r['negative_mass'])} |")
    return lines + [""]


def _section(run, rows) -> list[str]:
    lines = [f"## {run}", "",
             "| epoch | layer | p | method | top | trace | eff. rank | stable rank | neg. mass | "
             "neg. frac | cond | outliers | train err | test err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['epoch']} | {r['layer']} | {r['dim']} | {r['method']} | {_fmt(r['top'])} | "
            f"{_fmt(r['trace'])} | {_fmt(r['effective_rank'])} | {_fmt(r['stable_rank'])} | "
            f"{_fmt(r['negative_mass'])} | {_fmt(r['negative_fraction'])} | "
            f"{_fmt(r['condition_number'])} | {r['outliers']} | {_fmt(r['train_error'], '.3f')} "
            f"| {_fmt(r['test_error'], '.3f')} |")
    lines += ["", f"![{run} metrics]({run}/metrics.png)", ""]
    return lines


if __name__ == "__main__":
    main()
