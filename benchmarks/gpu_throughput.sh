#!/usr/bin/env bash
# The device benchmark of docs/PERFORMANCE.md in under 8 minutes on one GPU (H100/H200 class):
# PreActResNet18 in all three variants, ResNet-50 eager and channels-last+bf16 (its compilation
# alone would take minutes), FFCV's loader, one Ray Train worker against the loop in-process.
# Each part stops starting new cells past its budget; results stream to OUT/gpu_throughput.jsonl.
#   bash benchmarks/gpu_throughput.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-runs/gpu-throughput}}"
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT.gpu.txt" 2>/dev/null || true
$PY benchmarks/gpu_throughput.py --out "$OUT" --models preactresnet18 --steps 5 --rounds 3 --budget-s 150 \
  --skip-loader --skip-ray
$PY benchmarks/gpu_throughput.py --out "$OUT" --models resnet50 --variants eager,cl+bf16 --steps 2 --rounds 3 \
  --budget-s 330
