"""Dense float64 Hessian of the mean loss: kfacbound.curvature.exact against torch's own tools.

Network: fc 64 → 36 → 36 → 10, tanh, biases (4,042 parameters), cross-entropy, 100 examples
(8×8 MNIST-5k digits when available, else Gaussian inputs). All timings in one process, same data,
same thread count; the table reports time ratios (row / ours), the largest absolute difference
from our matrix and each row's peak resident memory (benchmarks/_mem.py). Rows: ``exact_hessian``
(the closed form for MLPs, ``kfacbound.curvature.exact._mlp_hessian``), our generic path
(vmapped Hessian-vector products against identity columns, used for any other network),
``torch.func.hessian`` and ``torch.autograd.functional.hessian``.

Second table (``layer_rows`` in the JSON): one layer block of a residual network, ResNet-8 of
widths 4-8-16 with BN on 1×28×28 inputs (Gaussian, the model at its seeded initialisation, eval
mode), block ``layer1.0.conv1`` (144 parameters), n examples: ``exact_hessian`` (H = H_O there,
so per-example Jacobians: ``kfacbound.curvature.exact.functional_part_vanishes``), the generic
path with that shortcut off, and ``torch.func.hessian`` of the loss in the layer's weight.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dense_hessian.py [--threads 1]
        [--repeat 3] [--device cpu] [--skip-loop] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from torch.func import functional_call

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _mem import best_of_runs  # noqa: E402  (benchmarks/ is the script dir)

from kfacbound.curvature.exact import _dense_hessian, _problem, exact_hessian  # noqa: E402
from kfacbound.curvature.layout import torch_to_layout_index  # noqa: E402
from kfacbound.losses import make_loss  # noqa: E402
from kfacbound.models import build_model, resolve_spec  # noqa: E402


def _data(n: int):
    try:
        from kfacbound.data import load_dataset

        ds = load_dataset("mnist5k", subset=n, downsample=8, flatten=True)
        return ds.X.to(torch.float64), ds.y, "mnist5k 8x8"
    except Exception:  # pragma: no cover - data missing
        g = torch.Generator().manual_seed(0)
        return (torch.randn(n, 64, generator=g, dtype=torch.float64),
                torch.randint(0, 10, (n,), generator=g), "gaussian")


def _layer_block(args, sync) -> tuple[str, list]:
    """The ResNet layer-block table: (header, rows of (name, seconds, max abs diff, memory))."""
    spec = resolve_spec({"arch": "resnet", "blocks": [1, 1, 1], "channels": [4, 8, 16]},
                        input_shape=[1, 28, 28], num_outputs=10)
    model = build_model(spec, seed=0).to(torch.float64).eval().to(args.device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(args.layer_n, 1, 28, 28, generator=g, dtype=torch.float64).to(args.device)
    y = torch.randint(0, 10, (args.layer_n,), generator=g).to(args.device)
    layer = "layer1.0.conv1"
    module = dict(model.named_modules())[layer]
    idx = torch_to_layout_index(module).to(args.device)
    base = {**{n: q.detach() for n, q in model.named_parameters()}, **dict(model.named_buffers())}
    names = [f"{layer}.{n}" for n, _ in module.named_parameters()]
    shapes = [q.shape for q in module.parameters()]
    loss = make_loss("ce")

    def objective(vec):
        state, s = dict(base), 0
        for n, sh in zip(names, shapes, strict=True):
            state[n] = vec[s:s + sh.numel()].reshape(sh)
            s += sh.numel()
        return loss(functional_call(model, state, (X,)), y)
    theta = torch.cat([q.detach().reshape(-1) for q in module.parameters()])

    def ours():
        H = exact_hessian(model, X, y, "ce", [layer], device=args.device)
        sync()
        return H

    def generic():
        problem = _problem(model, X, y, "ce", [layer], None, None, torch.float64, args.device,
                           None)
        H = _dense_hessian(problem, False, ggn_shortcut=False).cpu()
        sync()
        return H

    def func_hessian():
        H = torch.func.hessian(objective)(theta)
        sync()
        return H[idx][:, idx].cpu()
    ours()
    t_ours, H, mem = best_of_runs(ours, args.repeat, args.device)
    rows = [("kfacbound exact_hessian (H = H_O: per-example Jacobians)", t_ours, 0.0, mem)]
    for name, fn in (("kfacbound generic path (vmapped HVPs of identity columns)", generic),
                     ("torch.func.hessian", func_hessian)):
        t, R, m = best_of_runs(fn, args.repeat, args.device)
        rows.append((name, t, float((R - H).abs().max()), m))
    header = (f"dense layer block {layer} (p = {theta.numel()}) of ResNet-8 4-8-16 with BN, "
              f"1x28x28 Gaussian inputs, n = {args.layer_n}, float64, device {args.device}, "
              f"{args.threads} thread(s), best of {args.repeat}")
    return header, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-loop", action="store_true",
                    help="skip torch.autograd.functional.hessian with vectorize=False (slow)")
    ap.add_argument("--widths", default="36,36")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry run of gpu.sh)")
    ap.add_argument("--layer-n", type=int, default=100,
                    help="examples of the ResNet layer-block table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.widths, args.repeat, args.skip_loop = 20, "8,8", 1, True
        args.layer_n = 8
    torch.set_num_threads(args.threads)
    X, y, source = _data(args.n)
    widths = [int(w) for w in args.widths.split(",")]
    spec = resolve_spec({"arch": "fc", "widths": widths, "activation": "tanh", "bias": True},
                        input_shape=[64], num_outputs=10)
    model = build_model(spec, seed=0).to(torch.float64).eval()
    p = sum(q.numel() for q in model.parameters())
    X, y = X.to(args.device), y.to(args.device)
    model = model.to(args.device)

    # permutation from torch's (weight, bias) order to our [W | b] layout
    idx, off = [], 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            idx.append(torch_to_layout_index(m) + off)
            off += m.weight.numel() + m.bias.numel()
    idx = torch.cat(idx).to(args.device)
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    loss = make_loss("ce")

    def objective(vec):
        state, s = {}, 0
        for n, sh in zip(names, shapes, strict=True):
            k = sh.numel()
            state[n] = vec[s:s + k].reshape(sh)
            s += k
        return loss(functional_call(model, state, (X,)), y)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def ours():
        H = exact_hessian(model, X, y, "ce", device=args.device)
        sync()
        return H

    def ours_generic():
        problem = _problem(model, X, y, "ce", None, None, None, torch.float64, args.device, None)
        H = _dense_hessian(problem, False, structured=False).cpu()
        sync()
        return H

    def autograd_loop():
        H = torch.autograd.functional.hessian(objective, theta)
        sync()
        return H[idx][:, idx].cpu()

    def autograd_vec():
        H = torch.autograd.functional.hessian(objective, theta, vectorize=True)
        sync()
        return H[idx][:, idx].cpu()

    def func_hessian():
        H = torch.func.hessian(objective)(theta)
        sync()
        return H[idx][:, idx].cpu()

    ours()  # warm-up (functorch set-up)
    t_ours, H, mem = best_of_runs(ours, args.repeat, args.device)
    rows = [("kfacbound exact_hessian (MLP closed form)", t_ours, 0.0, mem)]
    refs = [("kfacbound generic path (vmapped HVPs of identity columns)", ours_generic),
            ("torch.func.hessian", func_hessian),
            ("torch.autograd.functional.hessian(vectorize=True)", autograd_vec)]
    if not args.skip_loop:
        refs.append(("torch.autograd.functional.hessian (default loop)", autograd_loop))
    for name, fn in refs:
        t, R, mem = best_of_runs(fn, 1 if "loop" in name else args.repeat, args.device)
        rows.append((name, t, float((R - H).abs().max()), mem))
        del R
    header = (f"dense Hessian, fc 64-{'-'.join(map(str, widths))}-10 tanh, p = {p}, n = {args.n} "
              f"({source}), float64, device {args.device}, {args.threads} thread(s), "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"best of {args.repeat}")
    print(f"# {header}")
    print("| method | seconds | time ratio to ours | max abs diff | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, t, diff, mem in rows:
        print(f"| {name} | {t:.2f} | {t / t_ours:.1f}x | {diff:.1e} | "
              f"{mem['peak_rss_mib']:.0f} |")
    layer_header, layer_rows = _layer_block(args, sync)
    print(f"\n# {layer_header}")
    print("| method | seconds | time ratio to ours | max abs diff | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    t_layer = layer_rows[0][1]
    for name, t, diff, mem in layer_rows:
        print(f"| {name} | {t:.2f} | {t / t_layer:.1f}x | {diff:.1e} | "
              f"{mem['peak_rss_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "p": p, "n": args.n, "threads": args.threads,
                       "device": args.device, "repeat": args.repeat,
                       "rows": [{"row": name, "seconds": t, "ratio_to_ours": t / t_ours,
                                 "max_abs_diff": diff, **mem}
                                for name, t, diff, mem in rows],
                       "layer_header": layer_header, "layer_n": args.layer_n,
                       "layer_rows": [{"row": name, "seconds": t, "ratio_to_ours": t / t_layer,
                                       "max_abs_diff": diff, **mem}
                                      for name, t, diff, mem in layer_rows]}, fh, indent=2)


if __name__ == "__main__":
    main()
