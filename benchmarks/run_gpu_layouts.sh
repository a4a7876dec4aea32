#!/usr/bin/env bash
# Multi-GPU layouts on one host (x4): agreement with tp=1 and decode step times, NCCL all-reduce
# time for one layer's payload. Logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
SHAPE=${SHAPE:-llama3-8b}
M="mpirun --allow-run-as-root --oversubscribe -x PYTHONPATH -x PYTHONUNBUFFERED -x NCCL_NVLS_ENABLE"
nvidia-smi -L
run() { name=$1; shift; echo "== $name"; timeout 120 "$@" --shape "$SHAPE" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | grep -vE "^\[meshlm" | tail -6; }
run tp1 python3 benchmarks/gpu_layouts.py
run tp2 $M -n 2 python3 benchmarks/gpu_layouts.py --tp 2
run pp2 $M -n 2 python3 benchmarks/gpu_layouts.py --pp 2
run tp2pp2 $M -n 4 python3 benchmarks/gpu_layouts.py --tp 2 --pp 2
run tp4 $M -n 4 python3 benchmarks/gpu_layouts.py --tp 4
for n in 2 4; do timeout 120 $M -n $n python3 benchmarks/nccl_allreduce.py 2>&1 | grep all-reduce; done
python3 benchmarks/gpu_layouts.py --compare "$OUT"/tp1.json "$OUT"/tp2.json "$OUT"/pp2.json "$OUT"/tp2pp2.json "$OUT"/tp4.json
