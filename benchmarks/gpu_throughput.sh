#!/usr/bin/env bash
# The device benchmark of docs/PERFORMANCE.md ("On a GPU") in about 8 minutes on one H100-class GPU:
# the CUDA-only host-sync tests, PreActResNet18 and ResNet-50 eager and channels-last+bf16, ATCD's
# M-H decomposition, then (last, as its compilation takes minutes) PreActResNet18 compiled; FFCV's
# loader and one Ray Train worker where those are installed. Each part is cut at its own timeout;
# results stream to OUT/*/gpu_throughput.jsonl, logs to OUT/*.log.
#   bash benchmarks/gpu_throughput.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-runs/gpu-throughput}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_host_sync.py 2>&1 | tee "$OUT/host_sync.log" | tail -3
timeout 100 $PY benchmarks/gpu_throughput.py --out "$OUT/p18" --models preactresnet18 --variants eager,cl+bf16 \
  --steps 5 --rounds 3 --budget-s 90 --skip-loader --skip-ray 2>&1 | tee "$OUT/p18.log" | grep '^|'
timeout 150 $PY benchmarks/gpu_throughput.py --out "$OUT/r50" --models resnet50 --variants eager,cl+bf16 \
  --steps 2 --rounds 3 --budget-s 110 2>&1 | tee "$OUT/r50.log" | grep -v '^{"model'
timeout 60 $PY benchmarks/gpu_atcd_overhead.py --out "$OUT/overhead" 2>&1 | tee "$OUT/overhead.log" | grep '^|'
timeout 220 $PY benchmarks/gpu_throughput.py --out "$OUT/p18c" --models preactresnet18 --variants cl+bf16+compile \
  --methods natural,fast,atcd-2-2,pgd-10 --steps 5 --rounds 3 --skip-loader --skip-ray 2>&1 | tee "$OUT/p18c.log" | grep '^|'
