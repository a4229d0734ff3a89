"""Top-k Hessian eigenvalues of T-600's first-layer block: our Lanczos vs PyHessian (issue 3).

Setup: T-600 (784-600-10, ReLU, Dziugaite & Roy init, seed 0) trained briefly so that the
Hessian is not taken at initialisation: ``kfacbound.train.train_model`` for 2 epochs of SGD
(lr 0.01, momentum 0.9, batch 100, seed 0) on the first n = 10,000 Fashion-MNIST training images
(flattened, scaled to [0, 1]) if Debian's dataset-fashion-mnist is installed, else on random data
of that shape (the header line says which). Curvature: the Hessian of the mean 10-class
cross-entropy over those same n examples with respect to the first layer ``fc1`` only (weight and
bias: 600 × 785 = 471,000 parameters), all n examples in one batch, model in eval mode.

Rows (all measured in this one process, on the same model and data):

- reference: ``top_eigenpairs(hessian_operator(..., params="fc1"), k, tol=1e-10)``, i.e. our
  Lanczos (ARPACK ``eigsh``, implicitly restarted) in float64 with a tight tolerance. The block
  is too large for a dense ``eigh``; the reference eigenvalues are the yardstick for the relative
  errors below.
- PyHessian 0.1: ``hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)`` then
  ``.eigenvalues(maxIter, tol=1e-3, top_n=k)`` (its defaults except maxIter, see --max-iter):
  power iteration with deflation, float32, one Hessian-vector product per iteration on the
  gradient graph built once in its constructor. It is restricted to the first-layer block by
  setting ``requires_grad=False`` on every other parameter: its ``get_params_grad`` skips those,
  which the script checks (its parameter list must be exactly [fc1.weight, fc1.bias]) and
  cross-checks one of its Hessian-vector products against ours. Its eigenvalues are sorted
  descending before comparison.
- ours: ``top_eigenpairs(hessian_operator(..., params="fc1", dtype=float32), k, tol=t,
  method=m)`` for each m in --methods ('arpack': ARPACK's implicitly restarted Lanczos;
  'lanczos': one unrestarted run that stops when the residuals meet t) and t in --tols (loosest
  first), stopping at the first t whose max relative error is at most PyHessian's ("matched"
  row; the headline takes the faster matched method); float32 like PyHessian. Optionally
  (--float64) the same tolerance once more with the float64 operator (the library default).

Hessian-vector product row (issue 11): seconds per product on the same block, float32, averaged
over --hvp-products products after one warm-up: PyHessian's ``hessian_vector_product`` on the
graph its constructor keeps; ours through ``hessian_operator(..., dtype=float32)`` with the
gradient graph cached (the default when it fits in GRAPH_MEMORY = 2 GiB: n = 10,000 needs about
0.2 GiB here) and with ``cache_graph=False`` (rebuilt per product, as before issue 11).

Every row also records its peak resident memory (benchmarks/_mem.py).

For each row: wall time (including set-up: our operator construction, PyHessian's constructor
with its forward and create_graph backward), the number of Hessian-vector products (our operator
counts them; PyHessian's ``hessian_vector_product`` is wrapped with a counter) and
max_i |λ_i − λ_i^ref| / |λ_i^ref| over the k eigenvalues sorted descending. The headline is the
time ratio PyHessian / ours at matched accuracy. Best of --repeats runs for the timed rows (the
reference runs once). Other jobs may share the machine; the ratios are measured in one process
and within minutes of each other, so they remain meaningful, the absolute seconds less so.

PyHessian is a benchmark-only dependency (not in pyproject): install it without its
dependencies, so that it cannot replace torch:

    .venv/bin/pip install --no-deps pyhessian==0.1

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lanczos.py [--n 10000] [--k 20]
        [--threads 1] [--device cpu] [--max-iter 100] [--tols 1e-2,1e-3,1e-4,1e-5]
        [--ncv NCV] [--repeats 1] [--float64] [--hvp-products 5] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _mem import PeakMemory  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

from kfacbound.curvature.operators import hessian_operator  # noqa: E402
from kfacbound.curvature.spectral import top_eigenpairs  # noqa: E402
from kfacbound.data import KDataset, load_dataset  # noqa: E402
from kfacbound.train import TrainConfig, train_model  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"
LAYER = "fc1"
TRAIN = TrainConfig(epochs=2, lr=0.01, momentum=0.9, batch_size=100, seed=0)


def load_data(n: int) -> tuple[KDataset, str]:
    if os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")):
        return (load_dataset("fashion-mnist", subset=n, flatten=True),
                f"Fashion-MNIST train (first {n})")
    g = torch.Generator().manual_seed(0)
    X = torch.rand(n, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    spec = {"name": "random", "n": n, "input_shape": [784]}
    return KDataset(X, y, 10, spec), "random data (Fashion-MNIST not installed)"


class _StandIn:
    """PyHessian 0.1's interface, reimplemented (power iteration with deflation on a graph built
    once), for ``--quick`` dry runs where PyHessian is not installed. Not used for any result."""

    def __init__(self):
        def hvp(gradsH, params, v):
            return torch.autograd.grad(gradsH, params, grad_outputs=v, retain_graph=True)

        def orthnormal(w, v_list):
            for v in v_list:
                w = [a - sum(float((x * y).sum()) for x, y in zip(w, v, strict=True)) * b
                     for a, b in zip(w, v, strict=True)]
            norm = sum(float((x * x).sum()) for x in w) ** 0.5
            return [x / (norm + 1e-6) for x in w]

        self.hessian_vector_product, self.orthnormal = hvp, orthnormal
        outer = self

        class Hessian:
            def __init__(self, model, criterion, data, cuda=False):
                X, y = data
                self.params = [q for q in model.parameters() if q.requires_grad]
                loss = criterion(model(X), y)
                self.gradsH = torch.autograd.grad(loss, self.params, create_graph=True)

            def eigenvalues(self, maxIter=100, tol=1e-3, top_n=1):
                evals, evecs = [], []
                for _ in range(top_n):
                    v = outer.orthnormal([torch.randn_like(q) for q in self.params], evecs)
                    ev = None
                    for _ in range(maxIter):
                        Hv = outer.hessian_vector_product(self.gradsH, self.params, v)
                        new = sum(float((a * b).sum()) for a, b in zip(Hv, v, strict=True))
                        v = outer.orthnormal(list(Hv), evecs)
                        if ev is not None and abs(ev - new) / (abs(ev) + 1e-6) < tol:
                            ev = new
                            break
                        ev = new
                    evals.append(ev)
                    evecs.append(v)
                return evals, evecs

        self.hessian = Hessian


def max_rel_error(evals: np.ndarray, ref: np.ndarray) -> float:
    a = np.sort(np.asarray(evals, dtype=np.float64))[::-1]
    return float(np.max(np.abs(a - ref) / np.abs(ref)))


def layout_vector(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """vec([W | b]) row-major: the coordinates of our layer block."""
    return torch.cat([weight, bias[:, None]], dim=1).reshape(-1)


def best_of(fn: Callable[[], dict[str, Any]], repeats: int, device: str = "cpu"
            ) -> dict[str, Any]:
    best: dict[str, Any] | None = None
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            out = fn()
        out.update(mem.record())
        if best is None or out["seconds"] < best["seconds"]:
            best = out
    assert best is not None
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-iter", type=int, default=100,
                    help="PyHessian's maxIter: power iterations per eigenvalue (its default 100)")
    ap.add_argument("--pyhessian-tol", type=float, default=1e-3)
    ap.add_argument("--ref-tol", type=float, default=1e-10)
    ap.add_argument("--tols", default="1e-2,1e-3,1e-4,1e-5",
                    help="our eigsh tolerances, loosest first; stop at the first that matches")
    ap.add_argument("--repeats", type=int, default=1, help="best of R runs per timed row")
    ap.add_argument("--float64", action="store_true",
                    help="also time ours with the float64 operator at the matched tolerance")
    ap.add_argument("--ncv", type=int, default=None, help="eigsh's ncv for our rows")
    ap.add_argument("--methods", default="arpack,lanczos",
                    help="our top_eigenpairs methods to time, each with its own --tols sweep")
    ap.add_argument("--hvp-products", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, no PyHessian needed (CPU dry run of benchmarks/gpu.sh)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.max_iter, args.hvp_products, args.tols = 300, 3, 20, 2, "1e-2"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")
    dev, k = args.device, args.k

    # the module, not the class of the same name that pyhessian/__init__.py re-exports
    try:
        ph = importlib.import_module("pyhessian.hessian")
    except ImportError:
        if not args.quick:
            raise SystemExit("PyHessian is needed: .venv/bin/pip install --no-deps "
                             "pyhessian==0.1") from None
        ph = _StandIn()

    t0 = time.perf_counter()
    ds, data_name = load_data(args.n)
    model, _, metrics = train_model("T-600", ds, config=TRAIN, progress=False)
    model = model.eval()
    train_seconds = time.perf_counter() - t0
    print(f"trained 2 epochs in {train_seconds:.1f} s: train loss {metrics['train_loss']:.4f}, "
          f"train error {metrics['train_error']:.4f}", file=sys.stderr, flush=True)
    X, y = ds.X.to(dev), ds.y.to(dev)
    model = model.to(dev)
    p = model.fc1.weight.numel() + model.fc1.bias.numel()

    # --- PyHessian on the fc1 block only: every other parameter has requires_grad=False -------
    hvp_count = [0]
    original_hvp = ph.hessian_vector_product

    def counting_hvp(gradsH, params, v):
        hvp_count[0] += 1
        return original_hvp(gradsH, params, v)

    ph.hessian_vector_product = counting_hvp
    # orthnormal(v, eigenvectors) runs once per power iteration; len(eigenvectors) is the index
    # of the eigenvalue being computed, so this counts the iterations spent on each one.
    iterations: list[int] = []
    original_orthnormal = ph.orthnormal

    def counting_orthnormal(w, v_list):
        while len(iterations) <= len(v_list):
            iterations.append(0)
        iterations[len(v_list)] += 1
        return original_orthnormal(w, v_list)

    ph.orthnormal = counting_orthnormal

    def pyhessian_model() -> nn.Module:
        m = copy.deepcopy(model)
        for name, q in m.named_parameters():
            q.requires_grad_(name.startswith(f"{LAYER}."))
            q.grad = None
        return m

    # Check the restriction and that both compute the same Hessian-vector product (warm-up too).
    pm = pyhessian_model()
    hc = ph.hessian(pm, nn.CrossEntropyLoss(), data=(X, y), cuda=dev.startswith("cuda"))
    if [id(q) for q in hc.params] != [id(pm.fc1.weight), id(pm.fc1.bias)]:
        raise SystemExit(f"PyHessian did not restrict to {LAYER}: "
                         f"{[tuple(q.shape) for q in hc.params]}")
    g = torch.Generator().manual_seed(1)
    vw = torch.randn(pm.fc1.weight.shape, generator=g).to(dev)
    vb = torch.randn(pm.fc1.bias.shape, generator=g).to(dev)
    hw, hb = original_hvp(hc.gradsH, hc.params, [vw, vb])
    theirs = layout_vector(hw, hb).detach().cpu().double().numpy()
    op64 = hessian_operator(model, X, y, "ce", params=LAYER, device=dev)
    if op64.shape[0] != p:
        raise SystemExit(f"operator size {op64.shape[0]} != {p}")
    mine = op64.matvec(layout_vector(vw, vb).cpu().double().numpy())
    hvp_diff = float(np.linalg.norm(theirs - mine) / np.linalg.norm(mine))
    del op64

    # --- seconds per Hessian-vector product on the same block, float32 ------------------------
    m_hvp = args.hvp_products
    vs = [torch.randn(p, generator=g).numpy().astype(np.float32) for _ in range(m_hvp + 1)]

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    def per_product(apply) -> float:
        apply(vs[0])  # warm-up (and, for a cached operator, the one graph build)
        sync()
        t = time.perf_counter()
        for v in vs[1:]:
            apply(v)
        sync()
        return (time.perf_counter() - t) / m_hvp

    def ph_apply(v, hc=hc, pm=pm):
        t = torch.from_numpy(v).to(dev).reshape(pm.fc1.weight.shape[0], -1)
        return original_hvp(hc.gradsH, hc.params, [t[:, :-1].contiguous(), t[:, -1].contiguous()])

    hvp_rows = []
    for name, make in [
        ("PyHessian 0.1 hessian_vector_product (graph kept)", None),
        ("ours, cached gradient graph (default)", lambda: hessian_operator(
            model, X, y, "ce", params=LAYER, device=dev, dtype=np.float32, cache_graph=True)),
        ("ours, graph rebuilt per product (cache_graph=False)", lambda: hessian_operator(
            model, X, y, "ce", params=LAYER, device=dev, dtype=np.float32, cache_graph=False)),
    ]:
        with PeakMemory(dev) as mem:
            if make is None:
                sec = per_product(ph_apply)
            else:
                op = make()
                sec = per_product(op.matvec)
                del op
        hvp_rows.append({"row": name, "seconds_per_product": sec, **mem.record()})
        print(f"HVP: {name}: {sec:.3f} s per product", file=sys.stderr, flush=True)
    for r in hvp_rows:
        r["time_ratio_pyhessian_over_row"] = hvp_rows[0]["seconds_per_product"] / \
            r["seconds_per_product"]
    del hc, pm, ph_apply
    op64 = hessian_operator(model, X, y, "ce", params=LAYER, device=dev)
    print(f"PyHessian params = [fc1.weight, fc1.bias] ({p} entries); its Hv vs ours (float64): "
          f"relative difference {hvp_diff:.2e}", file=sys.stderr, flush=True)

    # --- reference: our Lanczos in float64, tight tolerance ---------------------------------
    op64.num_products = 0
    t0 = time.perf_counter()
    with PeakMemory(dev) as ref_mem:
        ref, _ = top_eigenpairs(op64, k, tol=args.ref_tol)
    ref_row = {"row": f"reference: ours float64, eigsh tol={args.ref_tol:g}",
               "seconds": time.perf_counter() - t0, "hvps": op64.num_products,
               "max_rel_error": 0.0, **ref_mem.record()}
    del op64
    print(f"reference: {ref_row['seconds']:.1f} s, {ref_row['hvps']} HVPs; eigenvalues "
          f"{ref[0]:.6g} ... {ref[-1]:.6g}", file=sys.stderr, flush=True)

    # --- PyHessian ---------------------------------------------------------------------------
    def run_pyhessian() -> dict[str, Any]:
        torch.manual_seed(0)
        m = pyhessian_model()
        hvp_count[0] = 0
        iterations.clear()
        t = time.perf_counter()
        h = ph.hessian(m, nn.CrossEntropyLoss(), data=(X, y), cuda=dev.startswith("cuda"))
        evals, _ = h.eigenvalues(maxIter=args.max_iter, tol=args.pyhessian_tol, top_n=k)
        seconds = time.perf_counter() - t
        del h, m
        evals = np.asarray(evals, dtype=np.float64)
        return {"row": f"PyHessian 0.1 power iteration, tol={args.pyhessian_tol:g}, "
                       f"maxIter={args.max_iter}",
                "seconds": seconds, "hvps": hvp_count[0],
                "max_rel_error": max_rel_error(evals, ref),
                "eigenvalues": np.sort(evals)[::-1].tolist(),
                "found_out_of_order": bool(np.any(np.diff(evals) > 0)),
                "iterations": list(iterations),
                "reached_max_iter": sum(i >= args.max_iter for i in iterations)}

    pyh = best_of(run_pyhessian, args.repeats, dev)
    print(f"PyHessian: {pyh['seconds']:.1f} s, {pyh['hvps']} HVPs, max rel error "
          f"{pyh['max_rel_error']:.2e}, iterations {pyh['iterations']}", file=sys.stderr,
          flush=True)

    # --- ours, loosest tolerance first until PyHessian's accuracy is matched -----------------
    def run_ours(tol: float, dtype: type, method: str) -> dict[str, Any]:
        t = time.perf_counter()
        op = hessian_operator(model, X, y, "ce", params=LAYER, device=dev, dtype=dtype)
        evals, _ = top_eigenpairs(op, k, tol=tol, ncv=args.ncv, method=method)
        seconds = time.perf_counter() - t
        bits = 32 if dtype is np.float32 else 64
        name = ("eigsh" + (f", ncv={args.ncv}" if args.ncv else "") if method == "arpack"
                else "unrestarted Lanczos")
        return {"row": f"ours float{bits}, {name} tol={tol:g}", "tol": tol, "method": method,
                "seconds": seconds, "hvps": op.num_products,
                "max_rel_error": max_rel_error(evals, ref),
                "eigenvalues": np.sort(evals)[::-1].tolist()}

    ours: list[dict[str, Any]] = []
    matched_rows: list[dict[str, Any]] = []
    for method in [m for m in args.methods.split(",") if m]:
        for tol in [float(s) for s in args.tols.split(",") if s]:
            row = best_of(lambda tol=tol, method=method: run_ours(tol, np.float32, method),
                          args.repeats, dev)
            ours.append(row)
            print(f"ours {method} tol={tol:g}: {row['seconds']:.1f} s, {row['hvps']} HVPs, "
                  f"max rel error {row['max_rel_error']:.2e}", file=sys.stderr, flush=True)
            if row["max_rel_error"] <= pyh["max_rel_error"]:
                row["matched"] = True
                matched_rows.append(row)
                break
    matched = min(matched_rows, key=lambda r: r["seconds"]) if matched_rows else None
    if matched is not None and args.float64:
        ours.append(best_of(lambda: run_ours(matched["tol"], np.float64, matched["method"]),
                            args.repeats, dev))

    rows = [ref_row, pyh, *ours]
    for r in rows:
        r["time_ratio_pyhessian_over_row"] = pyh["seconds"] / r["seconds"]
    device_name = (torch.cuda.get_device_name(dev) if dev.startswith("cuda")
                   else f"{platform.processor() or platform.machine()} CPU")
    header = (f"T-600 (trained {TRAIN.epochs} epochs, train loss {metrics['train_loss']:.3f}), "
              f"Hessian of mean cross-entropy w.r.t. {LAYER} (p = {p}), top k = {k}, "
              f"{data_name}, n = {len(X)} in one batch, {args.threads} threads, {device_name}, "
              f"torch {torch.__version__}, best of {args.repeats}")
    print(f"\n{header}\n")
    print("| method | seconds | HVPs | max rel. error vs reference | PyHessian time / this "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mark = " (matched)" if r.get("matched") else ""
        print(f"| {r['row']}{mark} | {r['seconds']:.1f} | {r['hvps']} | "
              f"{r['max_rel_error']:.1e} | {r['time_ratio_pyhessian_over_row']:.2f} | "
              f"{r['peak_rss_mib']:.0f} |")
    print("\n| Hessian-vector product (float32) | seconds per product | PyHessian / this "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|")
    for r in hvp_rows:
        print(f"| {r['row']} | {r['seconds_per_product']:.3f} | "
              f"{r['time_ratio_pyhessian_over_row']:.2f} | {r['peak_rss_mib']:.0f} |")
    if matched is not None:
        print(f"\nAt matched accuracy (ours {matched['max_rel_error']:.1e} ≤ PyHessian "
              f"{pyh['max_rel_error']:.1e}): PyHessian / ours = "
              f"{pyh['seconds'] / matched['seconds']:.2f}× time, "
              f"{pyh['hvps'] / matched['hvps']:.2f}× Hessian-vector products.")
    else:
        print("\nNo tolerance in --tols reached PyHessian's accuracy.")
    print(f"PyHessian iterations per eigenvalue: {pyh['iterations']} "
          f"({pyh['reached_max_iter']} of {k} stopped at maxIter = {args.max_iter})")
    print(f"Reference eigenvalues: {', '.join(f'{v:.5g}' for v in ref)}")
    print(f"PyHessian's Hv vs ours (float64) on a random vector: relative difference "
          f"{hvp_diff:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "data": data_name, "n": len(X), "k": k, "p": p,
                       "layer": LAYER, "threads": args.threads, "device": device_name,
                       "torch": torch.__version__, "repeats": args.repeats,
                       "training": {"epochs": TRAIN.epochs, "lr": TRAIN.lr,
                                    "momentum": TRAIN.momentum,
                                    "batch_size": TRAIN.batch_size, "seed": TRAIN.seed,
                                    "train_loss": metrics["train_loss"],
                                    "train_error": metrics["train_error"]},
                       "pyhessian": {"max_iter": args.max_iter, "tol": args.pyhessian_tol},
                       "reference_eigenvalues": ref.tolist(), "hvp_relative_difference":
                       hvp_diff, "rows": rows, "hvp_rows": hvp_rows, "ncv": args.ncv,
                       "time_ratio_matched": (pyh["seconds"] / matched["seconds"]
                                              if matched else None),
                       "hvp_ratio_matched": (pyh["hvps"] / matched["hvps"]
                                             if matched else None)}, fh, indent=2)


if __name__ == "__main__":
    main()
