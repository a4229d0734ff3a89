"""Exact layer-block products for Lanczos: the layer-local GGN operator against products through
the network, on the layers the structure study runs Lanczos on.

Networks (zoo, seeded initialisation, eval mode, float64): ResNet-8 of widths 8-16-32 with BN
(the BatchNorm study's ``resnet8-w8``), LeNet-5 with BN and T-600 (784-600-10, the Lanczos
benchmark's network), 1×28×28 inputs; n examples of
Fashion-MNIST's training set when Debian's dataset-fashion-mnist is installed, else Gaussian
inputs (the header says which). Blocks: every Linear/Conv layer with more than 2,000 parameters
(the structure study's dense limit: these are the Lanczos blocks). For each block, in this one
process: ``exact_block_operator(..., route="layer-ggn")`` (set-up: C reverse passes to the
layer output, then layer-local products; kfacbound.curvature.layer_ggn) and
``route="hvp"`` (Hessian-vector products through the network on the cached gradient graph),
seconds per product averaged over --products products after one warm-up, set-up seconds, the
time for a Lanczos-sized run of --lanczos products (set-up + products) and their ratio, and the
relative difference of the two products (both are the exact H block: the layer-ggn route is
only taken where ``functional_part_vanishes`` passed). Peak RSS per row (benchmarks/_mem.py).

Second table (``dense_rows``): the blocks with at most 2,000 parameters, which the structure
study forms densely: ``exact_hessian`` (the functional-part probe, then H = H_O from
``LayerGGN.dense``: C reverse passes per chunk and one batched GEMM with the layer's input rows)
against the same probe followed by per-example Jacobians of the network (``vmap`` of
``jacrev``, ``_dense_ggn(..., layer_local=False)``: the path before 2026-12-07), best of
--repeat, and their largest relative difference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_layer_ggn.py [--n 2000] [--threads 1]
        [--products 3] [--lanczos 80] [--device cpu] [--networks LIST] [--quick]
        [--json out.json]
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

from _mem import PeakMemory, best_of_runs  # noqa: E402

from kfacbound.curvature.exact import (  # noqa: E402
    _dense_ggn,
    exact_hessian,
    functional_part_vanishes,
)
from kfacbound.curvature.layer_ggn import exact_block_operator  # noqa: E402
from kfacbound.curvature.layout import curvature_layers, layer_size  # noqa: E402
from kfacbound.curvature.operators import CurvatureProblem  # noqa: E402
from kfacbound.models import build_model, resolve_spec  # noqa: E402

NETWORKS = {
    "resnet8-w8 BN": {"arch": "resnet", "blocks": [1, 1, 1], "channels": [8, 16, 32]},
    "lenet5 BN": {"arch": "lenet5", "bn": True},
    "T-600": {"arch": "T-600"},
}


def _data(n: int):
    try:
        from kfacbound.data import dataset_tensors, load_dataset

        X, y = dataset_tensors(load_dataset("fashion-mnist", "train"))
        return X[:n].to(torch.float64), y[:n], "Fashion-MNIST"
    except Exception:  # pragma: no cover - data missing
        g = torch.Generator().manual_seed(0)
        return (torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64),
                torch.randint(0, 10, (n,), generator=g), "gaussian")


def _route(model, X, y, layer, route, products, device):
    with PeakMemory(device) as mem:
        t = time.perf_counter()
        op = exact_block_operator(model, X, y, "ce", layer, "H", route=route, device=device)
        v = np.random.default_rng(0).standard_normal(op.shape[0])
        first = op.matvec(v)
        setup = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(products):
            op.matvec(v)
        per = (time.perf_counter() - t) / products
    return op.route, setup, per, first, mem.record()


def _dense(model, X, y, layer, repeat, device):
    """(seconds of exact_hessian, of probe + vmap Jacobians, max rel. diff, peak RSS MiB of
    each)."""
    def ours():
        return exact_hessian(model, X, y, "ce", [layer], device=device)

    def vmapped():
        problem = CurvatureProblem(model, X, y, "ce", [layer], device=device)
        assert functional_part_vanishes(problem)
        return _dense_ggn(problem, False, layer_local=False).cpu()
    t_o, G_o, m_o = best_of_runs(ours, repeat, device)
    t_v, G_v, m_v = best_of_runs(vmapped, repeat, device)
    diff = float((G_o - G_v).abs().max() / G_v.abs().max())
    return t_o, t_v, diff, m_o["peak_rss_mib"], m_v["peak_rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--products", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="best of R for the dense table")
    ap.add_argument("--lanczos", type=int, default=80,
                    help="products of the Lanczos-sized run the ratio is taken for")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--networks", default=",".join(NETWORKS),
                    help=f"comma-separated subset of: {', '.join(NETWORKS)}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry run of gpu.sh)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.products = 16, 1
    torch.set_num_threads(args.threads)
    X, y, source = _data(args.n)
    X, y = X.to(args.device), y.to(args.device)
    rows, dense_rows = [], []
    for net in args.networks.split(","):
        arch = NETWORKS[net]
        spec = resolve_spec(arch, input_shape=[1, 28, 28], num_outputs=10)
        model = build_model(spec, seed=0).to(torch.float64).eval().to(args.device)
        small = [name for name, m in curvature_layers(model) if layer_size(m) <= 2000]
        if small:  # warm-up of the dense path
            exact_hessian(model, X[:2], y[:2], "ce", small[:1], device=args.device)
        for layer, module in curvature_layers(model):
            p = layer_size(module)
            if p <= 2000:
                t_o, t_v, diff, m_o, m_v = _dense(model, X, y, layer, args.repeat, args.device)
                dense_rows.append({"network": net, "layer": layer, "p": p, "exact_hessian_s": t_o,
                                   "vmap_jacobians_s": t_v, "ratio": t_v / t_o,
                                   "max_rel_diff": diff, "exact_hessian_peak_rss_mib": m_o,
                                   "vmap_jacobians_peak_rss_mib": m_v})
                continue
            r_l, s_l, t_l, v_l, m_l = _route(model, X, y, layer, "layer-ggn", args.products,
                                             args.device)
            r_h, s_h, t_h, v_h, m_h = _route(model, X, y, layer, "hvp", args.products,
                                             args.device)
            run_l, run_h = s_l + args.lanczos * t_l, s_h + args.lanczos * t_h
            rows.append({"network": net, "layer": layer, "p": p, "route": r_l,
                         "layer_ggn_setup_s": s_l, "layer_ggn_product_s": t_l,
                         "hvp_setup_s": s_h, "hvp_product_s": t_h,
                         "product_ratio": t_h / t_l, "lanczos_ratio": run_h / run_l,
                         "rel_diff": float(np.linalg.norm(v_l - v_h) / np.linalg.norm(v_h)),
                         "peak_rss_mib": max(m_l["peak_rss_mib"], m_h["peak_rss_mib"])})
    header = (f"exact layer-block products, n = {args.n} ({source}), float64, device "
              f"{args.device}, {args.threads} thread(s), torch {torch.__version__}; Lanczos run "
              f"= set-up + {args.lanczos} products")
    print(f"# {header}")
    print("| network | layer | p | route | layer-ggn set-up s | layer-ggn s/product | "
          "hvp s/product | product ratio | Lanczos-run ratio | rel. diff | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['layer']} | {r['p']} | {r['route']} | "
              f"{r['layer_ggn_setup_s']:.2f} | {r['layer_ggn_product_s']:.3f} | "
              f"{r['hvp_product_s']:.3f} | {r['product_ratio']:.1f}x | "
              f"{r['lanczos_ratio']:.1f}x | {r['rel_diff']:.0e} | {r['peak_rss_mib']:.0f} |")
    print(f"\n# dense blocks (p <= 2000), n = {args.n} ({source}), float64, best of "
          f"{args.repeat}")
    print("| network | layer | p | exact_hessian s | probe + vmap Jacobians s | ratio | "
          "max rel. diff | peak RSS MiB (exact_hessian / vmap) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in dense_rows:
        print(f"| {r['network']} | {r['layer']} | {r['p']} | {r['exact_hessian_s']:.2f} | "
              f"{r['vmap_jacobians_s']:.2f} | {r['ratio']:.1f}x | {r['max_rel_diff']:.0e} | "
              f"{r['exact_hessian_peak_rss_mib']:.0f} / {r['vmap_jacobians_peak_rss_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "n": args.n, "threads": args.threads,
                       "device": args.device, "rows": rows, "dense_rows": dense_rows}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
