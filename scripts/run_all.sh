#!/usr/bin/env bash
# Regenerate the batch-driven results: one `kfacbound batch` per study spec in scripts/specs/
# (all except smoke.toml), then its BatchNorm comparison where the study has BN pairs.
#
#   scripts/run_all.sh [OUT_ROOT] [WORKERS] [STUDY ...]
#   scripts/run_all.sh                      # every study into results/<study>, 2 workers
#   scripts/run_all.sh results 2 bn_study   # one study
#
# Every study is resumable: rerunning picks up where an interrupted run stopped. The exit status
# is non-zero when any job of any study failed (see results/<study>/report.md).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-results}
WORKERS=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
KFB=${KFB:-.venv/bin/kfacbound}
if [ $# -gt 0 ]; then
  STUDIES=("$@")
else
  STUDIES=()
  for spec in scripts/specs/*.toml; do
    name=$(basename "$spec" .toml)
    [ "$name" = smoke ] || STUDIES+=("$name")
  done
fi
status=0
for study in "${STUDIES[@]}"; do
  spec=scripts/specs/$study.toml
  out=$ROOT/$study
  echo "== $study: $KFB batch $spec --out $out --workers $WORKERS ($(date -u +%FT%TZ))"
  "$KFB" batch "$spec" --out "$out" --workers "$WORKERS" || status=1
  if grep -Eq '^bn *= *\[ *(false *, *true|true *, *false) *\]' "$spec"; then
    "$KFB" compare --batch "$out" -o "$out/bn-report" || status=1
  fi
done
exit $status
