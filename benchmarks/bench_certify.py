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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfacbound.bounds.certify import (  # noqa: E402
    DEFAULT_ITERATIONS,
    kfac_factors,
    mc_errors,
)
from kfacbound.bounds.optimize import optimize_posterior  # noqa: E402
from kfacbound.bounds.posteriors import build_posterior, build_prior  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    X, y, source = load(args.n)
    spec = resolve_spec("T-600", input_shape=[784], num_outputs=1)
    init = build_model(spec, seed=0)
    model = build_model(spec, seed=1).eval()
    res: dict = {"data": source, "n": len(X), "threads": torch.get_num_threads()}

    t = time.perf_counter()
    factors = kfac_factors(model, X, y, "bce", "kflr")
    res["kflr_factors_s"] = time.perf_counter() - t
    for kind in ("diag", "kfac"):
        Q = build_posterior(model, kind, factors=factors, n=len(X))
        P = build_prior(Q, init)
        t = time.perf_counter()
        mc_errors(Q, X, y, passes=args.passes, progress=False)
        per_example = args.passes * len(X) / (time.perf_counter() - t)
        sec_pass = one_network_per_pass(Q, X, y, args.passes)
        t = time.perf_counter()
        optimize_posterior(Q, P, X, y, iterations=args.steps, progress=False)
        step = (time.perf_counter() - t) / args.steps
        res[kind] = {
            "per_example_samples_per_s": per_example,
            "one_network_per_pass_samples_per_s": 1.0 / sec_pass,
            "speedup": per_example * sec_pass,
            "seconds_per_step": step,
            "end_to_end_estimate_s": step * DEFAULT_ITERATIONS + 10 * len(X) / per_example
            + (res["kflr_factors_s"] if kind == "kfac" else 0.0),
        }
        print(kind, json.dumps(res[kind], indent=1), flush=True)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
