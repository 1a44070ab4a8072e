#!/usr/bin/env bash
# The docs/RESULTS.md comparison: every method on Fashion-MNIST (eps 0.1, SmallCNN, the full
# 55,000 training images, the full 10,000 test images), then one Markdown table.
#
#   bash benchmarks/fashion_mnist_table.sh [OUT_DIR]      (about an hour on 2 CPU cores)
#
# Two queues run side by side, one thread each, so that the wall clock fits in about an hour;
# training seconds are therefore measured under the same load for every method.
set -euo pipefail
OUT=${1:-runs/fashion-mnist-table}
mkdir -p "$OUT"
ATTACKS="eval.attacks=[pgd20,mifgsm20,cw20,tapgd20]"
run() {  # method, epochs, extra args...
  local method=$1 epochs=$2; shift 2
  OMP_NUM_THREADS=1 python -m atcd_ray.train fashion-mnist --method "$method" --epochs "$epochs" --seed 0 \
    --out "$OUT/$method" --quiet --set "$ATTACKS" "$@" > "$OUT/$method.log" 2>&1
}
# Epochs follow the recipe's accounting for a budget of N = 10: Free-m runs N/m, ATCD N/(T K);
# PGD-AT (11 passes per image) gets 3, which still makes it the most expensive.
( run pgd 3 && run fast 10 ) &
( run atcd 5 && run free 5 && run natural 10 ) &
wait
python benchmarks/summaries_table.py "$OUT"/*/summary.json
