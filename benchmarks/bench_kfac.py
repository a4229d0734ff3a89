"""K-FAC extraction cost relative to one plain forward+backward epoch (issues 3 and 12).

Networks (``--arch``, comma-separated): T-600 (784-600-10, ReLU; batch 1000 on n = 60,000) and
LeNet-5 (conv 6-16, fc 120-84-10; batch 256 on the first ``--n-lenet`` = 10,000 examples), on
the Fashion-MNIST training set if Debian's dataset-fashion-mnist is installed, else random data
of that shape. Every time is measured in this one process, on the same data and batches, and
divided by the time of one plain epoch (forward, cross-entropy, backward) of the same network.
Rows: BackPACK's stock KFAC (1 MC sample) and KFLR extensions; kfacbound's compute_kfac with
backend="backpack" (BackPACK backprop with our module extensions) and backend="native" (forward
hooks for Ã, one backward per loss-Hessian square-root column for G, half-flop Gram products);
curvlinops 3.0.1 KFACLinearOperator 'mc' and 'type-2'. Rows are interleaved over the repeats
(best of R), so that background load hits all rows alike. Each row also records its peak
resident memory (benchmarks/_mem.py: peak RSS during the row and its increase over the RSS
before it; on CUDA the peak allocated device memory).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kfac.py [--arch T-600,lenet5]
        [--n 60000] [--n-lenet 10000] [--threads 1] [--repeats 3] [--device cpu]
        [--skip backpack,curvlinops] [--quick] [--json out.json]

Prints a markdown table per network. Issue 12 goals: KFAC (1 MC) ≤ 1.5×, KFLR (C = 10) ≤ 3×.
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

from _mem import PeakMemory  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

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


def bench_arch(arch: str, X, y, data_name: str, bs: int, args) -> dict:
    dev = args.device
    spec = resolve_spec(arch, input_shape=list(X.shape[1:]), num_outputs=10)
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
    rows = [(name, fn) for name, fn in rows
            if name.startswith("plain") or not any(s.lower() in name.lower() for s in skip)]
    for _, fn in rows:
        fn(2 * bs)  # warm-up on two batches (imports, allocator, vmap/BLAS initialisation)
    best = {name: float("inf") for name, _ in rows}
    memory: dict[str, dict] = {}
    for r in range(args.repeats):  # interleaved, so that background load hits all rows alike
        for name, fn in rows:
            with PeakMemory(dev) as mem:
                t = timed(fn, dev, 1)
            best[name] = min(best[name], t)
            rec = mem.record()
            if name not in memory or rec["peak_rss_mib"] > memory[name]["peak_rss_mib"]:
                memory[name] = rec
            print(f"{arch} repeat {r + 1}: {name:40s} {best[name]:8.2f} s "
                  f"peak {rec['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    base = best[rows[0][0]]
    results = [{"row": name, "seconds": t, "ratio": t / base, **memory[name]}
               for name, t in best.items()]
    print(f"\n{arch} on {data_name}, n = {len(X)}, batch {bs}, {args.threads} threads, "
          f"torch {torch.__version__}, best of {args.repeats}\n")
    print("| extraction | seconds | × plain epoch | peak RSS (MiB) | RSS increase (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['seconds']:.2f} | {r['ratio']:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['rss_increase_mib']:.0f} |")
    return {"arch": arch, "data": data_name, "n": len(X), "batch_size": bs, "rows": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="T-600,lenet5")
    ap.add_argument("--n", type=int, default=60000, help="examples for T-600")
    ap.add_argument("--n-lenet", type=int, default=10000, help="examples for LeNet-5")
    ap.add_argument("--batch-size", type=int, default=1000, help="T-600 batch size")
    ap.add_argument("--batch-size-lenet", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="best of R runs per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip, e.g. curvlinops")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, one repeat (CPU dry run of benchmarks/gpu.sh)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_lenet, args.repeats = 2000, 512, 1
        args.batch_size, args.batch_size_lenet = 500, 128
    torch.set_num_threads(args.threads)
    archs = [a for a in args.arch.split(",") if a]
    X, y, data_name = load_data(max(args.n, args.n_lenet), args.device)
    out = []
    for arch in archs:
        n, bs = ((args.n_lenet, args.batch_size_lenet) if arch.lower().startswith("lenet")
                 else (args.n, args.batch_size))
        out.append(bench_arch(arch, X[:n], y[:n], data_name, bs, args))
    dev = args.device
    device_name = (torch.cuda.get_device_name(dev) if dev.startswith("cuda")
                   else f"{platform.processor() or platform.machine()} CPU")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "device": device_name, "repeats": args.repeats,
                       "torch": torch.__version__, "archs": out,
                       # first network's rows at top level (older readers of this file)
                       "data": out[0]["data"], "n": out[0]["n"],
                       "batch_size": out[0]["batch_size"], "rows": out[0]["rows"]},
                      fh, indent=2)


if __name__ == "__main__":
    main()
