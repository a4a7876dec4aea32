#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md, in one run on one x4 machine:
#   one GPU: copy bandwidth; Llama-3-8B shape (bf16, random weights) at 128/128 and 1000/1000,
#            batch 1 and 64; Hugging Face transformers at the same batches (128/128);
#   Llama-70B shape at tp=4 (128/128, batch 1 and 64);
#   Llama-3-8B shape at tp=2 and tp=4 with `meshlm bench throughput` (64 prompts, 128/128, 1000/1000).
# Usage: OUT=results bash benchmarks/run_gpu_table.sh
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-table}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M="mpirun --allow-run-as-root --oversubscribe -x PYTHONPATH -x PYTHONUNBUFFERED -x NCCL_NVLS_ENABLE"
nvidia-smi -L
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/gpu_bench.py --lengths 128:128,1000:1000 --hf-lengths 128:128 \
    --out "$OUT/one_gpu.json" > "$RUNS/one_gpu.log" 2>&1; tail -8 "$RUNS/one_gpu.log"
echo "== llama3-70b tp=4"
timeout 150 $M -n 4 python3 benchmarks/gpu_layouts.py --shape llama3-70b --tp 4 --out "$OUT/llama70b_tp4.json" \
    > "$RUNS/llama70b.log" 2>&1; grep -vE "^\[meshlm" "$RUNS/llama70b.log" | tail -3
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '/tmp/meshlm-table-shape'))")
for tp in 2 4; do for len in 128 1000; do
  echo "== llama3-8b tp=$tp $len/$len, 64 prompts"
  timeout 100 $M -n $tp python3 -m meshlm bench throughput --model "$DIR" --load-format random --skip-tokenizer-init \
      --dtype bfloat16 --tp $tp --num-prompts 64 --input-len $len --output-len $len --max-concurrency 64 --warmup 4 \
      --max-model-len 4096 --no-progress --output-json "$OUT/tp${tp}_${len}.json" > "$RUNS/tp${tp}_${len}.log" 2>&1
  grep -E "Output token throughput|TTFT|TPOT" "$RUNS/tp${tp}_${len}.log"
done; done
