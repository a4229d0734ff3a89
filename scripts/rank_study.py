"""Regenerate results/rank/: Hessian rank against the deep-linear formulas (SCIENCE.md §4).

Studies (Glorot-normal init, seed 0, float64 dense Hessians, SVD rank with tolerance σ_max·p·eps):

1. ``mnist_width``: the reference width table's protocol: MNIST-5k digits downsampled to 8×8
   (nearest), first N = 100 training images, pixels / 255 (not centred), cross-entropy, hidden
   [w, w], no bias, w ∈ {4, 8, 16, 24, 36}; linear (the table), ReLU and tanh beside it.
2. ``gaussian_width``: X ~ N(0, I_16), 5 classes (random linear teacher), N = 100, CE, hidden
   [w, w], w ∈ {2, 4, 8, 16, 32}; linear, ReLU, tanh.
3. ``gaussian_depth``: same data, hidden [8]*L, L ∈ {1, …, 5}, linear.
4. ``gaussian_n``: same data family, hidden [8, 8], N ∈ {2, 4, 8, 12, 16, 24, 50, 100} (N < d and
   N ≥ d), linear.

Writes <study>.csv and <study>.png per study and README.md (tables, the command that made them).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/rank_study.py [--out results/rank] [--quick]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from kfacbound.analysis.rank import plot_sweep, sweep_ranks, write_csv
from kfacbound.data import load_dataset

REFERENCE = {4: (312, 216, 184, 88), 8: (656, 464, 336, 208), 16: (1440, 783, 369, 495),
             24: (2352, 1071, 369, 783), 36: (3960, 1503, 369, 1215)}


def mnist_data(n: int):
    ds = load_dataset("mnist5k", subset=n, downsample=8, flatten=True)
    return ds.X.to(torch.float64), ds.y, 10


def gaussian_data(n: int, d: int = 16, classes: int = 5):
    ds = load_dataset("gaussian", n=n, input_dim=d, classes=classes, seed=0)
    return ds.X.to(torch.float64), ds.y, classes


def _table(rows, title: str, reference: bool = False) -> list[str]:
    head = ("| act | depth | w | n | p | r | q | rank H (pred) | rank H_O (pred) | "
            "rank H_F (pred) | min gap |")
    lines = [f"### {title}", "", head + (" paper H / H_O / H_F |" if reference else ""),
             "|" + "---|" * (11 + reference)]
    for r in rows:
        if "rank_H" not in r:
            lines.append(f"| {r['activation']} | {r['depth']} | {r['width']} | {r['n']} | "
                         f"{r['params']} | skipped: {r.get('skipped')} |")
            continue
        gap = min(r[f"gap_{k}"] for k in ("H", "H_O", "H_F"))
        cells = [r["activation"], r["depth"], r["width"], r["n"], r["params"], r["r"], r["q"]]
        cells += [f"{r[f'rank_{k}']} ({r[f'pred_{k}']})" for k in ("H", "H_O", "H_F")]
        cells.append(f"{gap:.1e}")
        if reference:
            ref = REFERENCE.get(r["width"]) if r["activation"] == "linear" else None
            cells.append(" / ".join(map(str, ref[1:])) if ref else "")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/rank")
    ap.add_argument("--quick", action="store_true", help="small widths only (a smoke run)")
    ap.add_argument("--method", choices=["svd", "eigh"], default="svd")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    kw = {"method": args.method, "progress": progress, "seed": 0, "loss": "ce"}
    mnist_widths = [4, 8] if args.quick else [4, 8, 16, 24, 36]
    g_widths = [2, 4, 8] if args.quick else [2, 4, 8, 16, 32]
    studies: dict[str, tuple[list, str]] = {}
    t0 = time.time()

    rows = []
    for act in ("linear", "relu", "tanh"):
        rows += sweep_ranks(mnist_data, mnist_widths, [2], [100], activation=act,
                            extra={"dataset": "mnist5k-8x8"}, **kw)
    studies["mnist_width"] = (rows, "MNIST-5k 8×8, N = 100, CE, hidden [w, w], no bias")

    rows = []
    for act in ("linear", "relu", "tanh"):
        rows += sweep_ranks(gaussian_data, g_widths, [2], [100], activation=act,
                            extra={"dataset": "gaussian d=16 K=5"}, **kw)
    studies["gaussian_width"] = (rows, "Gaussian d = 16, K = 5, N = 100, CE, hidden [w, w]")

    depths = [1, 2, 3] if args.quick else [1, 2, 3, 4, 5]
    rows = sweep_ranks(gaussian_data, [8], depths, [100], activation="linear",
                       extra={"dataset": "gaussian d=16 K=5"}, **kw)
    studies["gaussian_depth"] = (rows, "Gaussian d = 16, K = 5, N = 100, CE, hidden [8]*L")

    ns = [2, 8, 16, 50] if args.quick else [2, 4, 8, 12, 16, 24, 50, 100]
    rows = sweep_ranks(gaussian_data, [8], [2], ns, activation="linear",
                       extra={"dataset": "gaussian d=16 K=5"}, **kw)
    studies["gaussian_n"] = (rows, "Gaussian d = 16, K = 5, CE, hidden [8, 8], varying N")

    command = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    md = ["# Hessian rank against the deep-linear formulas", "",
          f"Regenerate: `{command}` ({time.time() - t0:.0f} s on this machine).", "",
          "Dense float64 H, H_O (GGN) and H_F = H − H_O of the mean cross-entropy; rank = number "
          "of singular values above σ_max·p·eps; 'min gap' = smallest ratio σ_kept/σ_dropped at "
          "the cut over the three matrices (large = clean cut). Predictions (SCIENCE.md §4) are "
          "identities for linear networks and only estimates for ReLU/tanh. Glorot-normal init, "
          "seed 0.", ""]
    for name, (rows, title) in studies.items():
        write_csv(rows, out / f"{name}.csv")
        plot_sweep(rows, out / f"{name}.png", title=title)
        md += _table(rows, f"{name}: {title}", reference=name == "mnist_width")
        md += [f"![{name}]({name}.png)", ""]
    (out / "README.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
