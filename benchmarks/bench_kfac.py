"""K-FAC extraction cost relative to one plain forward+backward epoch (issue 3 benchmark).

T-600 (784-600-10, ReLU) on the Fashion-MNIST training set (60k) if Debian's
dataset-fashion-mnist is installed, else random data of that shape; batch 1000. Every time is
measured in this one process, on the same data and batches, and divided by the time of one plain
epoch (forward, cross-entropy, backward). Rows: BackPACK's stock KFAC (1 MC sample) and KFLR
extensions; kfacbound's compute_kfac with backend="backpack" (BackPACK backprop with our module
extensions) and backend="native" (forward hooks + one batched backward of the loss-Hessian
square root); curvlinops 3.0.1 KFACLinearOperator 'mc' and 'type-2'.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_kfac.py [--n 60000] [--threads 2]
        [--repeats 1] [--device cpu] [--json out.json]

Prints a markdown table. Issue 3 goals: ≤ 2.2× for one MC sample, ≤ 6× for KFLR (10 classes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kfacbound.curvature.kfac import compute_kfac  # noqa: E402
from kfacbound.models import build_model, resolve_spec  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"


def load_data(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    if os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")):
        from kfacbound.data import load_dataset

        ds = load_dataset("fashion-mnist", subset=n if n < 60000 else None)
        X, y = ds.tensors[0], ds.tensors[1]
        name = "Fashion-MNIST train"
    else:
        g = torch.Generator().manual_seed(0)
        X = torch.rand(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        name = "random data (Fashion-MNIST not installed)"
    return X[:n].to(device), y[:n].to(device), name


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="best of R runs per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip, e.g. curvlinops")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev, bs = args.device, args.batch_size
    X, y, data_name = load_data(args.n, dev)
    spec = resolve_spec("T-600", input_shape=list(X.shape[1:]), num_outputs=10)
    model = build_model(spec, seed=0).to(dev).eval()
    batches = [(X[i:i + bs], y[i:i + bs]) for i in range(0, len(X), bs)]
    lossfn = nn.CrossEntropyLoss()

    def plain(n: int = len(X)):
        for xb, yb in batches[: -(-n // bs)]:
            model.zero_grad(set_to_none=True)
            lossfn(model(xb), yb).backward()

    def ours(method: str, backend: str):
        def run(n: int = len(X)):
            compute_kfac(model, (X[:n], y[:n]), loss="ce", method=method, mc_samples=1,
                         batch_size=bs, device=dev, backend=backend, progress=False)
        return run

    def stock_backpack(method: str):
        """BackPACK 1.7.1's own KFAC/KFLR extensions, unmodified (batch means, not summed)."""
        import copy

        from backpack import backpack, extend
        from backpack.extensions import KFAC, KFLR

        ext_model = extend(copy.deepcopy(model))
        ext_loss = extend(nn.CrossEntropyLoss())

        def run(n: int = len(X)):
            for xb, yb in batches[: -(-n // bs)]:
                ext_model.zero_grad(set_to_none=True)
                with backpack(KFAC() if method == "kfac" else KFLR()):
                    ext_loss(ext_model(xb), yb).backward()
        return run

    def curvlinops(fisher_type: str):
        from curvlinops import KFACLinearOperator

        params = [p for p in model.parameters()]

        def run(n: int = len(X)):
            op = KFACLinearOperator(model, lossfn, params, batches[: -(-n // bs)],
                                    fisher_type=fisher_type, separate_weight_and_bias=False,
                                    check_deterministic=False, num_data=min(n, len(X)),
                                    num_per_example_loss_terms=1)
            op.compute_kronecker_factors()
        return run

    rows = [
        ("plain forward+backward epoch", plain),
        ("BackPACK 1.7.1 stock KFAC (1 MC)", stock_backpack("kfac")),
        ("BackPACK 1.7.1 stock KFLR", stock_backpack("kflr")),
        ("kfacbound backend=backpack KFAC (1 MC)", ours("kfac", "backpack")),
        ("kfacbound backend=backpack KFLR", ours("kflr", "backpack")),
        ("kfacbound backend=native KFAC (1 MC)", ours("kfac", "native")),
        ("kfacbound backend=native KFLR", ours("kflr", "native")),
        ("curvlinops KFAC 'mc'", curvlinops("mc")),
        ("curvlinops KFAC 'type-2'", curvlinops("type-2")),
    ]
    skip = [s for s in args.skip.split(",") if s]
    rows = [(name, fn) for name, fn in rows if not any(s.lower() in name.lower() for s in skip)]
    for _, fn in rows:
        fn(2 * bs)  # warm-up on two batches (imports, allocator, vmap/BLAS initialisation)
    best = {name: float("inf") for name, _ in rows}
    for r in range(args.repeats):  # interleaved, so that background load hits all rows alike
        for name, fn in rows:
            best[name] = min(best[name], timed(fn, dev, 1))
            print(f"repeat {r + 1}: {name:40s} {best[name]:8.2f} s", file=sys.stderr, flush=True)
    base = best[rows[0][0]]
    results = [{"row": name, "seconds": t, "ratio": t / base} for name, t in best.items()]
    device_name = (torch.cuda.get_device_name(dev) if dev.startswith("cuda")
                   else f"{platform.processor() or platform.machine()} CPU")
    print(f"\nT-600 on {data_name}, n = {len(X)}, batch {bs}, {args.threads} threads, "
          f"{device_name}, torch {torch.__version__}, best of {args.repeats}\n")
    print("| extraction | seconds | × plain epoch |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['seconds']:.2f} | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"data": data_name, "n": len(X), "batch_size": bs, "threads": args.threads,
                       "device": device_name, "rows": results}, fh, indent=2)


if __name__ == "__main__":
    main()
