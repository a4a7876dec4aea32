#!/usr/bin/env bash
# One call on one GPU for the kernels' defaults: their GPU tests (decode over bf16 and fp8 pools,
# prefill, the small-batch GEMM), decode and prefill attention at the defaults as CUDA-graph
# replays, batch-1 decode steps (bf16 and FP8), then `meshlm bench throughput` at FP8 1000/1000
# (1000 prompts, FP8 KV) and bf16 2048/128 (1000 prompts). Each part has its own time limit (about
# 9 minutes in all); PART=kernels stops before the two throughput runs. Logs under $OUT.
# Usage: OUT=results [PART=all|kernels] bash benchmarks/run_gpu_kernel_checks.sh
set -uo pipefail
OUT=${OUT:-out}; PART=${PART:-all}; RUNS=${RUNS:-/tmp/meshlm-session}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
echo "== GPU tests of the kernels' defaults"
timeout 90 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_decode_attention.py tests/gpu/test_fp8_kv_kernels.py \
    tests/gpu/test_prefill_kernel.py tests/gpu/test_fp8_gemm_kernel.py -k "default or 16_bit or llama_shapes" \
    > "$OUT/pytest_kernels.log" 2>&1
grep -E "passed|failed|FAILED" "$OUT/pytest_kernels.log" | tail -8
for kv in auto fp8; do
  prefill=""; [ "$kv" = auto ] && prefill=1x8192,4x8192
  echo "== attention at the defaults, $kv KV (attention_bench.py --graph)"
  timeout 60 python3 benchmarks/attention_bench.py --graph --skip-flex --prefill "$prefill" --kv-cache-dtype $kv \
      --decode 1x32768,8x8192,256x1024,1024x1024 --out "$OUT/attention_$kv.json" > "$OUT/attention_$kv.log" 2>&1
  grep -E "^(decode|prefill)" "$OUT/attention_$kv.log"
done
echo "== batch-1 decode steps (profile_decode.py)"
timeout 40 python3 benchmarks/profile_decode.py --batches 1 --steps 20 > "$OUT/profile_bf16.log" 2>&1
tail -1 "$OUT/profile_bf16.log"
timeout 40 python3 benchmarks/profile_decode.py --quantization fp8 --batches 1 --steps 20 > "$OUT/profile_fp8.log" 2>&1
tail -1 "$OUT/profile_fp8.log"
[ "$PART" = kernels ] && exit 0
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '$RUNS/shape'))")
bench() {  # name, time limit, then the flags
  local name=$1 limit=$2; shift 2
  echo "== meshlm bench throughput $*"
  timeout "$limit" python3 -m meshlm bench throughput --model "$DIR" --load-format random --skip-tokenizer-init \
      --dtype bfloat16 --max-model-len 4096 --no-progress --output-json "$OUT/bench_$name.json" "$@" \
      > "$OUT/bench_$name.log" 2>&1
  grep -E "throughput|TTFT|TPOT|Steps|Time in|Decode-only|Peak KV|Error" "$OUT/bench_$name.log" | head -12
}
bench fp8_1000 170 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1000 --input-len 1000 --output-len 1000
bench bf16_2048 150 --num-prompts 1000 --input-len 2048 --output-len 128
