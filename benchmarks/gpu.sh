#!/usr/bin/env bash
# Run every benchmark on the GPU and write the results beside the CPU ones (issue 11, goal 5).
#
#   bash benchmarks/gpu.sh            # --device cuda, results in benchmarks/results/*_gpu.{json,md}
#   bash benchmarks/gpu.sh --dry-run  # --device cpu on tiny sizes (--quick), results in
#                                     # $KFB_BENCH_OUT (default: a temporary directory); the test
#                                     # suite runs this (tests/test_gpu_script.py)
#
# Budget: the five benchmarks are sized to finish in under 8 minutes on one GPU together; each
# gets a hard timeout (KFB_BENCH_TIMEOUT seconds, default 150) so that one slow benchmark cannot
# eat the others' time. Environment: PYTHON (default .venv/bin/python), KFB_BENCH_OUT.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
TIMEOUT="${KFB_BENCH_TIMEOUT:-150}"
if [ "${1:-}" = "--dry-run" ]; then
    DEV=cpu; QUICK=--quick; SUFFIX=dryrun
    OUT="${KFB_BENCH_OUT:-$(mktemp -d)}"
else
    DEV=cuda; QUICK=; SUFFIX=gpu
    OUT="${KFB_BENCH_OUT:-benchmarks/results}"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu.sh: no CUDA device (use --dry-run for the CPU check)" >&2; exit 2; }
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
run() {  # name, then the command
    local name="$1"; shift
    local t0=$SECONDS
    echo "== $name ($DEV)" >&2
    if timeout "$TIMEOUT" "$@" > "$OUT/${name}_${SUFFIX}.md" 2> "$OUT/${name}_${SUFFIX}.log"; then
        echo "   ok in $((SECONDS - t0)) s -> $OUT/${name}_${SUFFIX}.md" >&2
    else
        echo "   FAILED (exit $?) after $((SECONDS - t0)) s; see $OUT/${name}_${SUFFIX}.log" >&2
        status=1
    fi
}
if [ -n "$QUICK" ]; then
    KFAC_ARGS=(--quick --skip backpack)
else  # T-600 on all 60k, LeNet-5 on 10k, best of 3
    KFAC_ARGS=(--repeats 3)
fi
run bench_kfac "$PY" benchmarks/bench_kfac.py --device "$DEV" "${KFAC_ARGS[@]}" \
    --json "$OUT/bench_kfac_${SUFFIX}.json"
run bench_dense_hessian "$PY" benchmarks/bench_dense_hessian.py --device "$DEV" $QUICK \
    --skip-loop --json "$OUT/bench_dense_hessian_${SUFFIX}.json"
run bench_layer_ggn "$PY" benchmarks/bench_layer_ggn.py --device "$DEV" $QUICK \
    --json "$OUT/bench_layer_ggn_${SUFFIX}.json"
run bench_lanczos "$PY" benchmarks/bench_lanczos.py --device "$DEV" $QUICK \
    --json "$OUT/bench_lanczos_${SUFFIX}.json"
run bench_memory "$PY" benchmarks/bench_memory.py --device "$DEV" $QUICK \
    --json "$OUT/bench_memory_${SUFFIX}.json"
run bench_certify "$PY" benchmarks/bench_certify.py --device "$DEV" $QUICK \
    --out "$OUT/bench_certify_${SUFFIX}.json"
echo "results in $OUT" >&2
exit $status
