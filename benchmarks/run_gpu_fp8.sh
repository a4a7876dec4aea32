#!/usr/bin/env bash
# One call on one GPU for FP8 weights: tests/gpu/test_fp8_gpu.py, the FP8 GEMM micro-benchmark at
# Llama-3-8B's shapes (fp8_gemm_bench.py, which suggests WEIGHT_ONLY_MAX_ROWS), and `meshlm bench
# throughput --quantization fp8` on the Llama-3-8B shape (random weights quantized at load): 128/128
# with 2000 prompts, 1000/1000 with 1000 prompts (SKIP_LONG=1 skips) and batch 1 (TPOT). Logs under $OUT.
# Usage: OUT=results bash benchmarks/run_gpu_fp8.sh
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-session}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
echo "== tests/gpu/test_fp8_gpu.py tests/gpu/test_fp8_gemm_kernel.py"
timeout 300 python3 -m pytest -q tests/gpu/test_fp8_gpu.py tests/gpu/test_fp8_gemm_kernel.py -p no:cacheprovider \
    > "$OUT/pytest_fp8.log" 2>&1
grep -E "passed|failed|Error|error" "$OUT/pytest_fp8.log" | tail -15
echo "== FP8 GEMMs, Llama-3-8B shapes (fp8_gemm_bench.py)"
timeout 600 python3 benchmarks/fp8_gemm_bench.py --sweep --output-json "$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.log" 2>&1
tail -100 "$OUT/fp8_gemm.log"
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '$RUNS/shape'))")
run() {  # name, prompts, input, output, extra flags
  echo "== meshlm bench throughput --quantization fp8, Llama-3-8B shape, $3/$4, $2 prompts $5"
  timeout 300 python3 -m meshlm bench throughput --model "$DIR" --load-format random --skip-tokenizer-init \
      --dtype bfloat16 --quantization fp8 --num-prompts "$2" --input-len "$3" --output-len "$4" \
      --max-model-len 4096 --no-progress $5 --output-json "$OUT/bench_fp8_$1.json" > "$OUT/bench_fp8_$1.log" 2>&1
  grep -E "Output token|TTFT|TPOT|Error" "$OUT/bench_fp8_$1.log" | head -6
}
run 128 2000 128 128 ""
run batch1 8 128 128 "--sweep-concurrency 1"
[ -n "${SKIP_LONG:-}" ] && exit 0
run 1000 1000 1000 1000 ""
