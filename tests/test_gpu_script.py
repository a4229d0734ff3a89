"""benchmarks/gpu.sh passes its CPU dry run: every benchmark runs with --device cpu on tiny sizes
(--quick) and writes its results (issue 11, goal 5). No timing is checked."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_script_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, KFB_BENCH_OUT=str(tmp_path),
               OMP_NUM_THREADS="1", KFB_BENCH_TIMEOUT="300")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, (proc.stderr, logs)
    for name in ("bench_kfac", "bench_dense_hessian", "bench_layer_ggn", "bench_lanczos",
                 "bench_memory"):
        data = json.loads((tmp_path / f"{name}_dryrun.json").read_text())
        rows = data["rows"]
        assert rows and all("peak_rss_mib" in r for r in rows), name
    kfac = json.loads((tmp_path / "bench_kfac_dryrun.json").read_text())
    assert [a["arch"] for a in kfac["archs"]] == ["T-600", "lenet5"]
    assert (tmp_path / "bench_certify_dryrun.json").exists()
