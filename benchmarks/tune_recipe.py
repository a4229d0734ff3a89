"""Tuning runs behind the default certificate recipe (issue 11, goal 1): certify one checkpoint
with several optimiser settings and append one JSON line per run.

Seed 100 by default: these runs look at their own Monte-Carlo draws to compare settings, so the
certificates that report results use other MC seeds (the selection must not reuse them).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tune_recipe.py CKPT OUT.jsonl \
        '[{"posterior": "kfac", "iterations": 2000, "batch_size": 500, "lr": 1e-2,
           "mean_lr": 1e-3}]'

CKPT: e.g. ``kfacbound train --arch T-600 --dataset fashion-mnist --binary --epochs 20 --seed 0``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfacbound.bounds.certify import certify_checkpoint  # noqa: E402


def main() -> None:
    ckpt, out, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    for kw in runs:
        t = time.perf_counter()
        cert = certify_checkpoint(ckpt, None, progress=False, seed=seed, **kw)
        row = {"checkpoint": ckpt, "kw": kw, "bound": cert["bound"], "kl": cert["kl"],
               "mc_error": cert["mc_error"],
               "n": cert["n"], "test_error_stochastic": cert["test_error_stochastic"],
               "bounded_ce_bound": cert["bounded_ce"]["bound"], "time": cert["time_s"],
               "wall": time.perf_counter() - t}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
