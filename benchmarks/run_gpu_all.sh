#!/usr/bin/env bash
# One call on an x4 machine: GPU tests, the single-GPU benchmark, then the multi-GPU layouts.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
timeout 150 python3 -m pytest -q tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -8
bash benchmarks/run_gpu_layouts.sh
