"""Certification throughput and end-to-end cost of one T-600 bound (issue 4).

1. Effective Monte-Carlo samples per second, measured in one process on the same posterior:
   - per-example scheme (this package): every example gets its own network from Q (local
     reparameterisation), so one pass over n examples gives n independent Bernoulli draws;
   - one network per pass (public PAC-Bayes code): a whole network is drawn and evaluated on all
     n examples; the n outcomes share one weight draw, so a pass is ONE effective sample.
   The ratio of the two rates is the speed-up.
2. Optimisation cost: seconds per RMSprop step of the Dziugaite & Roy objective (diag and K-FAC),
   K-FAC factor time, and the extrapolated end-to-end time of one bound with the default
   iterations (20,000 steps + 10 MC passes).

Data: binary Fashion-MNIST (60k) when installed, else random data of the same shape.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_certify.py [--n 60000] [--out r.json]

3. ``--profile``: where one optimisation step's time goes (mean forward, sampling in the
   posterior's basis, KL/complexity, backward, optimiser), at the old and the new batch size.
4. ``--end-to-end CKPT``: issue 11's goal, side by side in one process on one checkpoint:
   ``certify_checkpoint`` with the command's default recipe (learnt prior, Q started at Q = P,
   500 steps, diagonal posterior) and with the previous default, ``--recipe dr`` (20,000 RMSprop
   steps of batch 100, lr 1e-3, data-free prior; diagonal and K-FAC posterior); wall-clock
   ratios and the bounds. A fresh MC seed (``--seed``, default 7) that no tuning run used.

``--device cuda`` runs every part on the GPU (benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfacbound.bounds.certificate import mc_errors  # noqa: E402
from kfacbound.bounds.certify import certify_checkpoint  # noqa: E402
from kfacbound.bounds.config import DEFAULT_BATCH, DEFAULT_ITERATIONS, RECIPES  # noqa: E402
from kfacbound.bounds.families import build_posterior  # noqa: E402
from kfacbound.bounds.gather import kfac_factors  # noqa: E402
from kfacbound.bounds.optimize import (  # noqa: E402
    objective_complexity,
    optimize_posterior,
    surrogate_loss,
)
from kfacbound.bounds.prior import build_prior  # noqa: E402
from kfacbound.losses import zero_one_errors  # noqa: E402
from kfacbound.models import build_model, resolve_spec  # noqa: E402


def load(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from kfacbound.data import load_dataset

        ds = load_dataset("fashion-mnist", binary=True, flatten=True)
        X, y = ds.tensors
        return X[:n], y[:n], "fashion-mnist (binary)"
    except Exception:  # noqa: BLE001 - any missing-data error: fall back to random data
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 784, generator=g), torch.randint(0, 2, (n,), generator=g), "random"


@torch.no_grad()
def one_network_per_pass(posterior, X, y, passes: int, batch_size: int = 2048) -> float:
    """Seconds per pass when one whole network is drawn per pass (public code's scheme)."""
    t = time.perf_counter()
    for _ in range(passes):
        net = posterior.mean_model()
        for (_path, layer), (_, mod) in zip(posterior.layers(), _mods(net), strict=True):
            W = layer.mean + layer.sample_noise(1)[0]
            mod.weight.copy_(W[:, :-1].reshape(mod.weight.shape))
            mod.bias.copy_(W[:, -1])
        for s in range(0, len(X), batch_size):
            zero_one_errors(net(X[s:s + batch_size]), y[s:s + batch_size]).sum()
    return (time.perf_counter() - t) / passes


def _mods(net):
    return [(n, m) for n, m in net.named_children() if hasattr(m, "weight")]


def pass_major_mc(posterior, X, y, passes: int, batch_size: int = 2048) -> float:
    """Seconds for ``passes`` MC passes drawn one pass at a time (the previous scheme)."""
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(passes):
            for s in range(0, len(X), batch_size):
                out = posterior(X[s:s + batch_size], sample=True, per_example=True)
                zero_one_errors(out, y[s:s + batch_size]).sum()
    return time.perf_counter() - t


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def profile_step(Q, P, X, y, batch_size: int, steps: int, device) -> dict[str, float]:
    """Milliseconds per optimisation step spent in each part (timed separately, synchronised)."""
    parts = dict.fromkeys(("mean_forward", "sampling", "kl_complexity", "backward",
                           "optimizer"), 0.0)
    opt = torch.optim.RMSprop([p for p in Q.parameters() if p.requires_grad]
                              + [P.log_lam], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    n = len(X)
    for step in range(steps + 2):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        xb, yb = X[idx], y[idx]
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            Q(xb, sample=False)
        _sync(device)
        t1 = time.perf_counter()
        logits = Q(xb, sample=True, per_example=False)
        _sync(device)
        t2 = time.perf_counter()
        B = objective_complexity(Q.kl(P), P, n, 0.025)
        _sync(device)
        t3 = time.perf_counter()
        loss = surrogate_loss(logits, yb) + torch.sqrt(B / 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t4 = time.perf_counter()
        opt.step()
        _sync(device)
        t5 = time.perf_counter()
        if step >= 2:  # warm-up
            parts["mean_forward"] += t1 - t0
            parts["sampling"] += (t2 - t1) - (t1 - t0)
            parts["kl_complexity"] += t3 - t2
            parts["backward"] += t4 - t3
            parts["optimizer"] += t5 - t4
    return {k: 1000 * v / steps for k, v in parts.items()}


#: The --end-to-end rows: (name, recipe, posterior). "dr" was the command's default recipe until
#: 2026-12-07 (20,000 RMSprop steps of batch 100, data-free prior), the goal's baseline.
END_TO_END = (("default recipe", "default", "diag"), ("dr recipe", "dr", "diag"),
              ("dr recipe, K-FAC", "dr", "kfac"))


def end_to_end(ckpt: str, device: str, seed: int, quick: bool) -> dict:
    """Today's default recipe against the previous one ("dr", diag and K-FAC posteriors), one
    checkpoint, one process, in the order of :data:`END_TO_END`."""
    rows = {}
    for name, recipe, posterior in END_TO_END:
        kw = dict(RECIPES[recipe])
        if quick:
            kw.update(iterations=20 if recipe == "default" else 200, prior_epochs=1)
        t = time.perf_counter()
        cert = certify_checkpoint(ckpt, None, posterior=posterior, device=device, seed=seed,
                                  progress=False, **kw)
        wall = time.perf_counter() - t
        rows[name] = {"wall_s": wall, "bound": cert["bound"], "kl": cert["kl"], "n": cert["n"],
                      "mc_error": cert["mc_error"], "time_s": cert["time_s"],
                      "optimizer": cert["optimizer"], "prior": cert["prior"],
                      "peak_rss_mib": _rss_mib()}
        print(name, json.dumps(rows[name]), flush=True)
    base = rows["default recipe"]["wall_s"]
    rows["speedup"] = {name: rows[name]["wall_s"] / base for name, *_ in END_TO_END[1:]}
    return rows


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="time the parts of one step")
    ap.add_argument("--end-to-end", metavar="CKPT", default=None,
                    help="certify CKPT with the current and the previous default recipe")
    ap.add_argument("--seed", type=int, default=7, help="seed of the --end-to-end certificates")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry run of gpu.sh)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.steps, args.passes = min(args.n, 2000), 10, 2
    dev = torch.device(args.device)
    res: dict = {"device": args.device, "threads": torch.get_num_threads()}
    if args.end_to_end:
        res["end_to_end"] = end_to_end(args.end_to_end, args.device, args.seed, args.quick)
        _write(res, args.out)
        return
    X, y, source = load(args.n)
    X, y = X.to(dev), y.to(dev)
    spec = resolve_spec("T-600", input_shape=[784], num_outputs=1)
    init = build_model(spec, seed=0)
    model = build_model(spec, seed=1).eval()
    res.update(data=source, n=len(X))

    t = time.perf_counter()
    factors = kfac_factors(model, X, y, "bce", "kflr", device=dev)
    _sync(dev)
    res["kflr_factors_s"] = time.perf_counter() - t
    for kind in ("diag", "kfac"):
        Q = build_posterior(model, kind, factors=factors, n=len(X)).to(dev)
        P = build_prior(Q, init).to(dev)
        if args.profile:
            res[kind] = {f"batch {b}": profile_step(Q, P, X, y, b, args.steps, dev)
                         for b in (DEFAULT_BATCH, RECIPES["fast"]["batch_size"])}
            print(kind, json.dumps(res[kind], indent=1), flush=True)
            continue
        t = time.perf_counter()
        mc_errors(Q, X, y, passes=args.passes, progress=False, device=dev)
        _sync(dev)
        per_example = args.passes * len(X) / (time.perf_counter() - t)
        pass_major = args.passes * len(X) / pass_major_mc(Q, X, y, args.passes)
        sec_pass = one_network_per_pass(Q, X, y, args.passes)
        t = time.perf_counter()
        optimize_posterior(Q, P, X, y, iterations=args.steps, progress=False, device=dev)
        _sync(dev)
        step = (time.perf_counter() - t) / args.steps
        res[kind] = {
            "per_example_samples_per_s": per_example,
            "pass_major_samples_per_s": pass_major,
            "passes_together_speedup": per_example / pass_major,
            "one_network_per_pass_samples_per_s": 1.0 / sec_pass,
            "speedup": per_example * sec_pass,
            "seconds_per_step": step,
            "batch_size": DEFAULT_BATCH,
            "end_to_end_estimate_s": step * DEFAULT_ITERATIONS + 10 * len(X) / per_example
            + (res["kflr_factors_s"] if kind == "kfac" else 0.0),
            "peak_rss_mib": _rss_mib(),
        }
        print(kind, json.dumps(res[kind], indent=1), flush=True)
    _write(res, args.out)


def _write(res: dict, out: str | None) -> None:
    print(json.dumps(res, indent=1))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
