"""Regenerate results/structure/: BN against non-BN Hessian structure (Dissecting Hessian).

For a T-600-like ReLU MLP (narrower by default: hidden [200]) and LeNet5, each with and without
BatchNorm, trained from several seeds on a Fashion-MNIST subset, report per layer the top-k
eigenspace overlap between every pair of models (exact by Lanczos/eigh on the layer Hessian
block, and K-FAC/KFLR), the rank-1 ratio of reshaped top eigenvectors, the alignment of Ã's top
eigenvector with E[ã], and the outlier count against C − 1 (kfacbound.analysis.structure).

Writes <out>/<arch>.json (full report), <arch>.png (one figure, BN and non-BN), summary.csv
(all summary rows) and README.md (tables, command, date, timings).

Example (defaults fit about 10 minutes on 2 CPU cores):
    python scripts/structure_study.py --out results/structure
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kfacbound.analysis.plots import plot_structure
from kfacbound.analysis.structure import SUMMARY_COLUMNS, structure_report
from kfacbound.checkpoint import atomic_write_text, load_checkpoint
from kfacbound.cli.common import write_json
from kfacbound.data import load_dataset
from kfacbound.train import TrainConfig, train_model

ARCHS = {
    "mlp": lambda width: {"arch": "fc", "widths": [width], "activation": "relu"},
    "lenet5": lambda width: {"arch": "lenet5"},
}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/structure")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--archs", default="mlp,lenet5")
    ap.add_argument("--width", type=int, default=200, help="MLP hidden width (T-600: 600)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lenet-seeds", default="0,1", help="seeds for LeNet5 (slower)")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--n-curv", type=int, default=200, help="examples for the curvature")
    ap.add_argument("--lenet-n-curv", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--lenet-layers", default="conv2,fc1,fc2,out",
                    help="LeNet5 layers analysed (conv1's exact products are slow on CPU)")
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
    curv_all = load_dataset(args.dataset, subset=max(args.n_curv, args.lenet_n_curv))
    started = time.perf_counter()
    summary_rows, sections, timings = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            t0 = time.perf_counter()
            seeds = [int(s) for s in (args.lenet_seeds if arch == "lenet5" else args.seeds)
                     .split(",")]
            n_curv = args.lenet_n_curv if arch == "lenet5" else args.n_curv
            models, metrics = [], {}
            for bn in (False, True):
                for seed in seeds:
                    label = f"{arch}{'-bn' if bn else ''}-s{seed}"
                    path = Path(tmp) / f"{label}.kfb"
                    config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed)
                    _, _, m = train_model(ARCHS[arch](args.width), train, test, config, out=path,
                                          progress=progress, bn=bn)
                    metrics[label] = {k: m[k] for k in ("train_error", "test_error")}
                    models.append((label, load_checkpoint(path).model))
            t_train = time.perf_counter() - t0
            X, y = curv_all.X[:n_curv], curv_all.y[:n_curv]
            layers = args.lenet_layers.split(",") if arch == "lenet5" else None
            report = structure_report(models, (X, y), "ce", layers=layers, k=args.k,
                                      dtype=args.dtype, progress=progress)
            report["meta"].update(arch=ARCHS[arch](args.width), dataset=args.dataset,
                                  n_train=args.n_train, epochs=args.epochs, seeds=seeds,
                                  model_metrics=metrics)
            write_json(out / f"{arch}.json", report)
            plot_structure(report, out / f"{arch}.png")
            for row in report["summary"]:
                summary_rows.append({"arch": arch, **row})
            timings[arch] = {"train_s": round(t_train, 1),
                             "structure_s": round(time.perf_counter() - t0 - t_train, 1)}
            sections.append(_section(arch, report, metrics, n_curv))
            print(f"{arch}: {timings[arch]}", file=sys.stderr)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["arch", *SUMMARY_COLUMNS])
    w.writeheader()
    w.writerows(summary_rows)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    cmd = "python scripts/structure_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    total = time.perf_counter() - started
    readme = [
        "# Hessian structure: BN against non-BN (Dissecting Hessian)", "",
        f"Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `{cmd.strip()}` in "
        f"{total / 60:.1f} min ({args.threads} CPU threads, torch {torch.__version__}).", "",
        f"Data: {args.dataset}, first {args.n_train} training examples, SGD lr {args.lr} momentum "
        f"0.9, batch 100, {args.epochs} epochs, cross-entropy; curvature (exact layer Hessian "
        f"block, {args.dtype} products; K-FAC = KFLR) on the first n_curv training examples. "
        "Overlap = ||V1^T V2||_F^2 / k between the top-k eigenspaces of two models (mean over "
        "pairs of the group; random subspaces give k/p). rank1 = sigma_1^2/sum sigma_i^2 of the "
        "top exact eigenvector reshaped to out x (in+1). alignA = |cos(top eigenvector of A, "
        "E[a~])|. out_ex/out_kf = outliers (largest >= 2x gap among the top max(k, 2(C-1)+2)) "
        "of the exact block / K-FAC, against C-1.", "",
        "Caveat: bn-vs-no-bn pairs include same-seed pairs, whose Linear/Conv layers start from "
        "identical initial weights (BatchNorm does not change them), so after a few epochs they "
        "can overlap more than different-seed pairs within a group. Networks are trained for "
        "only a few epochs on a subset (CPU budget); the Dissecting-Hessian claims concern "
        "converged networks.", "",
        *sum(sections, []),
        "Timings: " + json.dumps(timings), "",
    ]
    atomic_write_text(out / "README.md", "\n".join(readme))
    print(f"wrote {out} in {total:.0f} s", file=sys.stderr)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _section(arch, report, metrics, n_curv) -> list[str]:
    lines = [f"## {arch} (n_curv = {n_curv}, k = {report['meta']['k']})", "",
             "| group | layer | p | pairs | overlap exact@k | overlap K-FAC@k | random k/p | "
             "exact vs K-FAC@k | rank1 | alignA | out_ex | out_kf | C-1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["summary"]:
        lines.append(
            f"| {r['group']} | {r['layer']} | {r['dim']} | {r['pairs']} | "
            f"{_fmt(r['overlap_exact'])} | {_fmt(r['overlap_kfac'])} | "
            f"{_fmt(r['random_overlap'], '.2g')} | {_fmt(r['overlap_exact_kfac'])} | "
            f"{_fmt(r['rank1_top'])} | {_fmt(r['align_A_mean'])} | "
            f"{_fmt(r['outliers_exact'], '.1f')} | {_fmt(r['outliers_kfac'], '.1f')} | "
            f"{'-' if r['expected_outliers'] is None else r['expected_outliers']} |")
    errs = ", ".join(f"{k} {v['train_error']:.3f}/{v['test_error']:.3f}"
                     for k, v in metrics.items())
    lines += ["", f"Train/test error: {errs}", "", f"![{arch}]({arch}.png)", ""]
    return lines


if __name__ == "__main__":
    main()
