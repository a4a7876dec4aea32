#!/usr/bin/env bash
# One short call on one GPU for the decode and GEMM kernels' defaults: their GPU tests (the fused
# split merge, the fp8-pool decode defaults, the small-batch GEMM), decode attention at the
# defaults as CUDA-graph replays (bf16 and fp8 pools), batch-1 decode steps (FP8 and bf16), then
# `meshlm bench throughput --quantization fp8 --kv-cache-dtype fp8` at 1000/1000 with 1000 prompts.
# Each part has its own time limit (about 7 minutes in all). Logs under $OUT.
# Usage: OUT=results bash benchmarks/run_gpu_kernel_checks.sh
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-session}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
echo "== GPU tests of the decode and GEMM kernels"
timeout 100 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_decode_attention.py tests/gpu/test_fp8_kv_kernels.py \
    tests/gpu/test_fp8_gemm_kernel.py -k "cuda_graph_replay or fused_merge or large_shapes or forced or entry_point \
or llama_shapes or many_programs or widening or engine_with_graphs or 16_bit or weight_in or default_launch" \
    > "$OUT/pytest_kernels.log" 2>&1
grep -E "passed|failed|FAILED" "$OUT/pytest_kernels.log" | tail -8
for kv in auto fp8; do
  echo "== decode attention at the defaults, $kv KV (attention_bench.py --graph)"
  timeout 40 python3 benchmarks/attention_bench.py --graph --skip-flex --prefill "" --kv-cache-dtype $kv \
      --decode 1x32768,256x1024,1024x1024 --out "$OUT/attention_$kv.json" > "$OUT/attention_$kv.log" 2>&1
  grep -E "^decode" "$OUT/attention_$kv.log"
done
echo "== batch-1 decode steps (profile_decode.py)"
timeout 40 python3 benchmarks/profile_decode.py --quantization fp8 --batches 1 --steps 20 > "$OUT/profile_fp8.log" 2>&1
tail -1 "$OUT/profile_fp8.log"
timeout 35 python3 benchmarks/profile_decode.py --batches 1 --steps 20 > "$OUT/profile_bf16.log" 2>&1
tail -1 "$OUT/profile_bf16.log"
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '$RUNS/shape'))")
echo "== meshlm bench throughput --quantization fp8 --kv-cache-dtype fp8, 1000/1000, 1000 prompts"
timeout 160 python3 -m meshlm bench throughput --model "$DIR" --load-format random --skip-tokenizer-init \
    --dtype bfloat16 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1000 --input-len 1000 --output-len 1000 \
    --max-model-len 4096 --no-progress --output-json "$OUT/bench_fp8_1000.json" > "$OUT/bench_fp8_1000.log" 2>&1
grep -E "throughput|TTFT|TPOT|Error" "$OUT/bench_fp8_1000.log" | head -8
