"""Peak memory of a ResNet K-FAC extraction (issue 11, goal 4: it must fit in 4 GiB).

ResNet-8 of the model zoo (``kfacbound.models``, CIFAR stem, BatchNorm in eval mode) on
CIFAR-10-shaped inputs (3×32×32, random values: memory does not depend on them), 10 classes,
``compute_kfac`` native backend, KFAC (1 MC) and KFLR, batch 128. Each row is measured in this
process with benchmarks/_mem.py (peak RSS during the row, reset before it; on CUDA also the
peak allocated device memory) and its time is given for context.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py [--n 2048] [--batch-size 128]
        [--arch resnet8] [--device cpu] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _mem import PeakMemory  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

from kfacbound.curvature.kfac import compute_kfac  # noqa: E402
from kfacbound.models import build_model, resolve_spec  # noqa: E402

LIMIT_MIB = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet8")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry run of gpu.sh)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.batch_size = 64, 32
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    X = torch.rand(args.n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    model = build_model(resolve_spec(args.arch, input_shape=[3, 32, 32], num_outputs=10),
                        seed=0).eval()
    p = sum(q.numel() for q in model.parameters())
    rows = []
    for method in ("kfac", "kflr"):
        with PeakMemory(args.device) as mem:
            t = time.perf_counter()
            res = compute_kfac(model, (X, y), method=method, batch_size=args.batch_size,
                               device=args.device, progress=False)
            sec = time.perf_counter() - t
        rec = mem.record()
        rows.append({"row": f"{args.arch} compute_kfac {method}", "seconds": sec,
                     "layers": len(res), **rec, "fits_4GiB": rec["peak_rss_mib"] < LIMIT_MIB})
        del res
    header = (f"{args.arch} (p = {p}), n = {args.n}, batch {args.batch_size}, 3×32×32 inputs, "
              f"{args.threads} thread(s), device {args.device}, torch {torch.__version__}")
    print(f"# {header}\n")
    print("| row | seconds | peak RSS (MiB) | RSS increase (MiB) | < 4 GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['rss_increase_mib']:.0f} | {'yes' if r['fits_4GiB'] else 'no'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
