#!/usr/bin/env bash
# The GPU runs of this wave's issues on one GPU, in parts that each fit one ten-minute call:
#   PART=tests   tests/gpu (a carried llguidance wheel under build/ is installed for them, when present)
#   PART=kernels attention (bf16 and fp8 KV decode, prefill against SDPA and flex), whole-model
#                prefill against the GEMM rate, the FP8 GEMM benchmark and the speculative-decoding one
#   PART=bench   decode-step profile and `meshlm bench throughput` in bf16: 128/128 x 2000,
#                1000/1000 x 1000 (automatic max_batch_size), 2048/128 x 1000
#   PART=fp8     the same throughput workloads and profile with FP8 weights and FP8 KV
# Usage: OUT=results PART=tests bash benchmarks/run_gpu_wave.sh
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-session}; PART=${PART:-tests}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PIP_RETRIES=0 PIP_TIMEOUT=5  # the machine reaches no index: fail fast where something would fetch
nvidia-smi -L
echo "commit ${COMMIT:-unknown}"
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '$RUNS/shape'))")
COMMON=(--model "$DIR" --load-format random --skip-tokenizer-init --dtype bfloat16 --max-model-len 4096 --no-progress)
bench() {  # name, seconds, then the bench arguments
  local name=$1 limit=$2; shift 2
  echo "== meshlm bench throughput $name"
  timeout "$limit" python3 -m meshlm bench throughput "${COMMON[@]}" "$@" --output-json "$OUT/bench_$name.json" \
      > "$OUT/bench_$name.log" 2>&1
  echo "exit $?"; grep -E "Output token|TTFT|TPOT|Peak KV|max_batch_size [0-9]|Error" "$OUT/bench_$name.log" | head -6
}
case "$PART" in
tests)
  for wheel in build/*.whl; do
    [ -f "$wheel" ] && pip install --quiet --no-deps --no-index --target /tmp/carried "$wheel" && export PYTHONPATH=$PYTHONPATH:/tmp/carried
  done
  timeout 560 python3 -m pytest -q tests/gpu -p no:cacheprovider -rs > "$OUT/pytest_gpu.log" 2>&1
  echo "exit $?"; grep -E "passed|failed|FAILED|SKIPPED|Error" "$OUT/pytest_gpu.log" | tail -30
  ;;
kernels)
  echo "== GPU tests of FP8 weights, speculative decoding, prompt logprobs and long contexts"
  timeout 200 python3 -m pytest -q tests/gpu/test_fp8_gpu.py tests/gpu/test_spec_decode_gpu.py \
      tests/gpu/test_prompt_logprobs_gpu.py tests/gpu/test_long_context_gpu.py -p no:cacheprovider \
      > "$OUT/pytest_gpu_new.log" 2>&1
  echo "exit $?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest_gpu_new.log" | tail -12
  echo "== attention, bf16 KV"
  timeout 200 python3 benchmarks/attention_bench.py --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1
  echo "exit $?"; tail -14 "$OUT/attention.log"
  echo "== attention, fp8 KV"
  timeout 100 python3 benchmarks/attention_bench.py --kv-cache-dtype fp8 --prefill "" --skip-flex \
      --out "$OUT/attention_fp8.json" > "$OUT/attention_fp8.log" 2>&1
  echo "exit $?"; tail -7 "$OUT/attention_fp8.log"
  echo "== whole-model prefill (gpu_bench.py --prefill)"
  timeout 120 python3 benchmarks/gpu_bench.py --prefill 1x8192,8x2048 --batches 1 --lengths 16:4 --skip-hf \
      > "$OUT/prefill.log" 2>&1
  echo "exit $?"; tail -6 "$OUT/prefill.log"
  if [ -f benchmarks/fp8_gemm_bench.py ]; then
    echo "== FP8 GEMMs (fp8_gemm_bench.py)"
    timeout 100 python3 benchmarks/fp8_gemm_bench.py > "$OUT/fp8_gemm.log" 2>&1
    echo "exit $?"; tail -30 "$OUT/fp8_gemm.log"
  fi
  if [ -f benchmarks/spec_decode_gpu.py ]; then
    echo "== speculative decoding (spec_decode_gpu.py)"
    timeout 150 python3 benchmarks/spec_decode_gpu.py > "$OUT/spec.log" 2>&1
    echo "exit $?"; tail -15 "$OUT/spec.log"
  fi
  ;;
bench)
  echo "== FP8 GPU tests"
  timeout 100 python3 -m pytest -q tests/gpu/test_fp8_gpu.py -p no:cacheprovider > "$OUT/pytest_fp8.log" 2>&1
  echo "exit $?"; grep -E "passed|failed|FAILED" "$OUT/pytest_fp8.log" | tail -6
  echo "== profile of decode steps"
  timeout 120 python3 benchmarks/profile_decode.py --batches 1,64,256,1024 --steps 20 > "$OUT/profile.log" 2>&1
  echo "exit $?"; tail -6 "$OUT/profile.log"
  bench 128x128 120 --num-prompts 2000 --input-len 128 --output-len 128
  bench 2048x128 150 --num-prompts 1000 --input-len 2048 --output-len 128
  echo "== profile of decode steps, FP8 weights and KV"
  timeout 100 python3 benchmarks/profile_decode.py --batches 1,64,256 --steps 20 --quantization fp8 \
      --kv-cache-dtype fp8 > "$OUT/profile_fp8.log" 2>&1
  echo "exit $?"; tail -5 "$OUT/profile_fp8.log"
  bench fp8_128x128 110 --num-prompts 2000 --input-len 128 --output-len 128 --quantization fp8 --kv-cache-dtype fp8
  ;;
fp8)
  echo "== profile of decode steps, FP8 weights and KV"
  timeout 120 python3 benchmarks/profile_decode.py --batches 1,64,256 --steps 20 --quantization fp8 \
      --kv-cache-dtype fp8 > "$OUT/profile_fp8.log" 2>&1
  echo "exit $?"; tail -5 "$OUT/profile_fp8.log"
  bench fp8_128x128 120 --num-prompts 2000 --input-len 128 --output-len 128 --quantization fp8 --kv-cache-dtype fp8
  bench fp8_1000x1000 170 --num-prompts 1000 --input-len 1000 --output-len 1000 --quantization fp8 --kv-cache-dtype fp8
  ;;
esac
