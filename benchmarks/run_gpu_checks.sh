#!/usr/bin/env bash
# Everything the single-GPU check runs, in one call on the GPU machine; logs under $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi -L
python3 -m pytest -q tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
python3 benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -30
