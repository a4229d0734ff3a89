"""Does a K-FAC start vector cut the products of top-20 Lanczos? (issue 11, goal 3)

Product counts, not seconds: the number of Hessian-vector products our unrestarted Lanczos
(``lanczos_eigenpairs``: full reorthogonalisation, stops when k + ⌈k/4⌉ Ritz residuals meet
tol) needs for the top k = 20 eigenvalues of T-600's fc1 block, and the max relative error it
then has, for several start vectors v0. Same model, data and block as ``bench_lanczos.py``
(T-600 after 2 epochs on the first n Fashion-MNIST images, n = 2,000 by default, float32
operator with the gradient graph kept); the reference eigenvalues are ours in float64, ARPACK
tol 1e-10. Since a product costs what PyHessian's does on this block (``bench_lanczos.py``), the
time ratio to PyHessian's 357 products is at most 357 / products.

Start vectors (each reshaped to the block's [W | b] layout, 600 × 785):

- ``random seed s``: a standard normal vector (what ``top_eigenpairs`` uses), seeds 0, 1, 2;
- ``kfac power q``: G^q R Ã^q for the same random R (seed 0), with the layer's exact K-FAC
  factors (KFLR) on the same n examples: a soft filter towards the top of G ⊗ Ã;
- ``kfac top m``: a random combination of the m Kronecker eigenvectors u_i v_jᵀ with the
  largest λ_i(G) λ_j(Ã), plus 0.3 × the normalised random vector (so that no eigenvector of
  the exact block is left out of the Krylov space).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lanczos_start_vectors.py \\
        --json benchmarks/results/lanczos_start_vectors_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_lanczos import LAYER, TRAIN, load_data, max_rel_error  # noqa: E402

from kfacbound.curvature.kfac import compute_kfac  # noqa: E402
from kfacbound.curvature.operators import hessian_operator  # noqa: E402
from kfacbound.curvature.spectral import lanczos_eigenpairs, top_eigenpairs  # noqa: E402
from kfacbound.train import train_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--tols", default="0.3,0.2,0.15,0.1,0.05")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds, data_name = load_data(args.n)
    model, _, _ = train_model("T-600", ds, config=TRAIN, progress=False)
    model.eval()
    X, y = ds.X, ds.y
    ref, _ = top_eigenpairs(hessian_operator(model, X, y, "ce", params=LAYER), args.k, tol=1e-10)
    op = hessian_operator(model, X, y, "ce", params=LAYER, dtype=np.float32)
    t0 = time.perf_counter()
    layer = compute_kfac(model, (X, y), method="kflr", batch_size=len(X), progress=False)[LAYER]
    kfac_seconds = time.perf_counter() - t0
    G, A = layer.G.double(), layer.A.double()
    lg, Ug = torch.linalg.eigh(G)
    la, Ua = torch.linalg.eigh(A)
    shape = (G.shape[0], A.shape[0])

    def unit(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        return v / np.linalg.norm(v)

    R = np.random.default_rng(0).standard_normal(shape)
    starts = {f"random seed {s}": unit(np.random.default_rng(s).standard_normal(shape))
              for s in (0, 1, 2)}
    for q in (1, 4):
        M = torch.from_numpy(R)
        for _ in range(q):
            M = G @ M @ A
            M = M / M.norm()
        starts[f"kfac power {q}"] = unit(M.numpy())
    order = torch.argsort(torch.outer(lg, la).reshape(-1), descending=True)
    for m in (30, 60, 120):
        C = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
        C[order[:m]] = torch.from_numpy(np.random.default_rng(m).standard_normal(m))
        top = unit((Ug @ C.reshape(shape) @ Ua.T).numpy())
        starts[f"kfac top {m}"] = unit(top + 0.3 * unit(R))
    rows = []
    for name, v0 in starts.items():
        for tol in [float(t) for t in args.tols.split(",")]:
            op.num_products = 0
            evals, _ = lanczos_eigenpairs(op, args.k, v0=v0, tol=tol)
            rows.append({"start": name, "tol": tol, "products": op.num_products,
                         "max_rel_error": max_rel_error(evals, ref)})
            print(f"{name:16s} tol {tol:4.2f}: {rows[-1]['products']:3d} products, max rel error "
                  f"{rows[-1]['max_rel_error']:.2e}", file=sys.stderr, flush=True)
    print("| start vector | " + " | ".join(f"tol {t}" for t in args.tols.split(",")) + " |")
    print("|---|" + "---|" * len(args.tols.split(",")))
    for name in starts:
        cells = [f"{r['products']} ({r['max_rel_error']:.1e})" for r in rows if r["start"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": data_name, "n": args.n, "k": args.k, "layer": LAYER,
                       "reference": ref.tolist(), "kfac_seconds": kfac_seconds, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
