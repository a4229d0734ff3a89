"""Dense float64 Hessian of the mean loss: kfacbound.curvature.exact against torch's own tools.

Network: fc 64 → 36 → 36 → 10, tanh, biases (4,042 parameters), cross-entropy, 100 examples
(8×8 MNIST-5k digits when available, else Gaussian inputs). All timings in one process, same data,
same thread count; the table row reports time ratios (reference / ours) and the largest absolute
difference between the matrices.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dense_hessian.py [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.func import functional_call

from kfacbound.curvature.exact import exact_hessian
from kfacbound.curvature.layout import torch_to_layout_index
from kfacbound.losses import make_loss
from kfacbound.models import build_model, resolve_spec


def _data(n: int):
    try:
        from kfacbound.data import load_dataset

        ds = load_dataset("mnist5k", subset=n, downsample=8, flatten=True)
        return ds.X.to(torch.float64), ds.y, "mnist5k 8x8"
    except Exception:  # pragma: no cover - data missing
        g = torch.Generator().manual_seed(0)
        return (torch.randn(n, 64, generator=g, dtype=torch.float64),
                torch.randint(0, 10, (n,), generator=g), "gaussian")


def _best(fn, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-loop", action="store_true",
                    help="skip torch.autograd.functional.hessian with vectorize=False (slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    X, y, source = _data(args.n)
    spec = resolve_spec({"arch": "fc", "widths": [36, 36], "activation": "tanh", "bias": True},
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
    t_ours, H = _best(ours, args.repeat)
    rows = [("kfacbound exact_hessian", t_ours, 0.0)]
    refs = [("torch.func.hessian", func_hessian),
            ("autograd.functional.hessian(vectorize=True)", autograd_vec)]
    if not args.skip_loop:
        refs.append(("autograd.functional.hessian (default loop)", autograd_loop))
    for name, fn in refs:
        t, R = _best(fn, 1 if "loop" in name else args.repeat)
        rows.append((name, t, float((R - H).abs().max())))
    print(f"# dense Hessian, p = {p}, n = {args.n} ({source}), float64, device {args.device}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}")
    print("| method | seconds | ratio to ours | max abs diff |")
    print("|---|---|---|---|")
    for name, t, diff in rows:
        print(f"| {name} | {t:.2f} | {t / t_ours:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
