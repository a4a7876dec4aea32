#!/usr/bin/env bash
# Multi-GPU layouts on one host (x4): decode step times in bf16, agreement with tp=1 in bf16 and
# fp32, NCCL all-reduce time for one layer's payload. Logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-layouts}; mkdir -p "$OUT" "$RUNS/bf16" "$RUNS/fp32"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
SHAPE=${SHAPE:-llama3-8b}
M="mpirun --allow-run-as-root --oversubscribe -x PYTHONPATH -x PYTHONUNBUFFERED -x NCCL_NVLS_ENABLE"
nvidia-smi -L
run() { dir=$1; name=$2; shift 2; echo "== $dir/$name"
        timeout 150 "$@" --shape "$SHAPE" --out "$RUNS/$dir/$name.json" > "$RUNS/$dir/$name.log" 2>&1
        grep -vE "^\[meshlm" "$RUNS/$dir/$name.log" | tail -4; }
for dtype in bf16 fp32; do
  extra=""; [ $dtype = fp32 ] && extra="--dtype float32 --skip-timings"
  run $dtype tp1 python3 benchmarks/gpu_layouts.py $extra
  run $dtype tp2 $M -n 2 python3 benchmarks/gpu_layouts.py --tp 2 $extra
  run $dtype pp2 $M -n 2 python3 benchmarks/gpu_layouts.py --pp 2 $extra
  run $dtype tp2pp2 $M -n 4 python3 benchmarks/gpu_layouts.py --tp 2 --pp 2 $extra
  run $dtype tp4 $M -n 4 python3 benchmarks/gpu_layouts.py --tp 4 $extra
done
for n in 2 4; do timeout 120 $M -n $n python3 benchmarks/nccl_allreduce.py 2>&1 | grep all-reduce; done
for dtype in bf16 fp32; do
  python3 benchmarks/gpu_layouts.py --compare "$RUNS/$dtype"/tp1.json "$RUNS/$dtype"/tp2.json "$RUNS/$dtype"/pp2.json \
      "$RUNS/$dtype"/tp2pp2.json "$RUNS/$dtype"/tp4.json 2>&1 | tee "$OUT/compare_$dtype.txt"
done
tar czf "$OUT/layout_runs.tgz" -C "$RUNS" . 2>/dev/null
