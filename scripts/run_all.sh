#!/usr/bin/env bash
# Regenerate everything in results/: one command for all of it, one argument per study.
#
#   scripts/run_all.sh                     # every study below, in this order
#   scripts/run_all.sh rank bounds         # some of them
#
# Studies and the command each runs (results/README.md indexes what they write):
#   rank            python scripts/rank_study.py --out results/rank                  (issue 5)
#   structure       python scripts/structure_study.py --out results/structure        (issue 5)
#   spectra         python scripts/spectra_study.py --out results/spectra            (issue 5)
#   bounds          scripts/bounds_study.sh  (every table of results/bounds)         (issue 4)
#   <spec>          kfacbound batch scripts/specs/<spec>.toml --out results/<spec> --workers W,
#                   then kfacbound compare --batch results/<spec> -o results/<spec>/bn-report when
#                   the spec has BN pairs (issue 6); every spec except smoke.toml by default.
#
# WORKERS (default 2) sets batch workers; batch studies are resumable (rerun after an
# interruption). The exit status is non-zero when any study failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
KFB=${KFB:-.venv/bin/kfacbound}
WORKERS=${WORKERS:-2}
if [ $# -gt 0 ]; then
  STUDIES=("$@")
else
  STUDIES=(rank structure spectra bounds)
  for spec in scripts/specs/*.toml; do
    name=$(basename "$spec" .toml)
    [ "$name" = smoke ] || STUDIES+=("$name")
  done
fi
status=0
for study in "${STUDIES[@]}"; do
  echo "== $study ($(date -u +%FT%TZ))"
  case $study in
    rank) OMP_NUM_THREADS=1 "$PY" scripts/rank_study.py --out results/rank --no-progress ;;
    structure) "$PY" scripts/structure_study.py --out results/structure --no-progress ;;
    spectra) "$PY" scripts/spectra_study.py --out results/spectra --no-progress ;;
    bounds) scripts/bounds_study.sh ;;
    *)
      spec=scripts/specs/$study.toml
      out=results/$study
      "$KFB" batch "$spec" --out "$out" --workers "$WORKERS" &&
      if grep -Eq '^bn *= *\[ *(false *, *true|true *, *false) *\]' "$spec"; then
        "$KFB" compare --batch "$out" -o "$out/bn-report"
      fi ;;
  esac || status=1
done
exit $status
