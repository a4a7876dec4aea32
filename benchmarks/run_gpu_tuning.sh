#!/usr/bin/env bash
# Tuning runs on one GPU, in two parts that each fit one call of ten minutes.
#   PART=kernels: the decode-attention tile sweep (attention_bench.py --sweep) and a profile of decode
#                 steps (profile_decode.py: GPU busy fraction with and without the profiler, GC time).
#   PART=profile: the attention benchmark at the default tiles and the profile.
#   PART=bench:   `meshlm bench throughput` on the Llama-3-8B shape: 128/128 x 2000 prompts at
#                 max_num_tokens 8192 and 16384, and 1000/1000 x 1000 prompts at max_batch_size 768.
# Usage: OUT=results PART=kernels bash benchmarks/run_gpu_tuning.sh
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-session}; PART=${PART:-kernels}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
if [ "$PART" = kernels ] || [ "$PART" = profile ]; then
  if [ "$PART" = kernels ]; then
    echo "== paged decode attention, tile sweep (attention_bench.py --sweep)"
    timeout 330 python3 benchmarks/attention_bench.py --sweep --out "$OUT/attention_sweep.json" \
        > "$OUT/attention_sweep.log" 2>&1
    echo "exit $?"; grep -c "us " "$OUT/attention_sweep.log"
  else
    echo "== paged decode attention (attention_bench.py)"
    timeout 100 python3 benchmarks/attention_bench.py --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1
    tail -8 "$OUT/attention.log"
  fi
  echo "== profile of decode steps (profile_decode.py)"
  timeout 230 python3 benchmarks/profile_decode.py --batches 1,64,256,1024 --steps 20 \
      --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
  echo "exit $?"; tail -7 "$OUT/profile.log"
  exit 0
fi
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '$RUNS/shape'))")
COMMON=(--model "$DIR" --load-format random --skip-tokenizer-init --dtype bfloat16 --max-model-len 4096 --no-progress)
for tokens in 8192 16384; do
  echo "== meshlm bench throughput, 128/128, 2000 prompts, --max-num-tokens $tokens"
  timeout 170 python3 -m meshlm bench throughput "${COMMON[@]}" --num-prompts 2000 --input-len 128 \
      --output-len 128 --max-num-tokens $tokens --output-json "$OUT/bench_128_$tokens.json" \
      > "$OUT/bench_128_$tokens.log" 2>&1
  grep -E "Output token|TTFT|TPOT|max_batch|Error" "$OUT/bench_128_$tokens.log" | head -6
done
echo "== meshlm bench throughput, 1000/1000, 1000 prompts, --max-batch-size 768"
timeout 230 python3 -m meshlm bench throughput "${COMMON[@]}" --num-prompts 1000 --input-len 1000 \
    --output-len 1000 --max-batch-size 768 --output-json "$OUT/bench_1000.json" > "$OUT/bench_1000.log" 2>&1
grep -E "throughput|TTFT|TPOT|KV|Error" "$OUT/bench_1000.log" | head -12
