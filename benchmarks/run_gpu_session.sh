#!/usr/bin/env bash
# One call on one GPU: the GPU tests, decode steps by batch size (gpu_bench.py, SKIP_BENCH=1 skips),
# paged decode and prefill attention (attention_bench.py, SKIP_ATTENTION=1 skips), a profile of decode steps with
# the overlapped and the plain step loop (profile_decode.py), and `meshlm bench throughput` on the Llama-3-8B
# shape at 128/128 with 2000 prompts and 1000/1000 with 1000 prompts (SKIP_LONG=1 skips). Logs under $OUT.
# Usage: OUT=results COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_session.sh
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-session}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
echo "commit ${COMMIT:-unknown}"
echo "== tests/gpu"
timeout 300 python3 -m pytest -q tests/gpu -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
grep -E "passed|failed|Error|error" "$OUT/pytest_gpu.log" | tail -15
if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== decode steps, Llama-3-8B shape (gpu_bench.py)"
  timeout 200 python3 benchmarks/gpu_bench.py --batches 1,64,256,1024 --lengths 128:128 --skip-hf \
      --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1
  tail -12 "$OUT/gpu_bench.log"
fi
if [ -z "${SKIP_ATTENTION:-}" ]; then
  echo "== paged attention, decode and prefill (attention_bench.py)"
  timeout 300 python3 benchmarks/attention_bench.py --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1
  tail -22 "$OUT/attention.log"
fi
for loop in async-scheduling no-async-scheduling; do
  echo "== profile of decode steps (profile_decode.py --$loop)"
  timeout 150 python3 benchmarks/profile_decode.py --batches 1,64,256,1024 --$loop \
      --out "$OUT/profile_$loop.json" > "$OUT/profile_$loop.log" 2>&1
  tail -6 "$OUT/profile_$loop.log"
done
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '$RUNS/shape'))")
for loop in async-scheduling no-async-scheduling; do
  echo "== meshlm bench throughput, Llama-3-8B shape, 128/128, 2000 prompts, --$loop"
  timeout 150 python3 -m meshlm bench throughput --model "$DIR" --load-format random --skip-tokenizer-init \
      --dtype bfloat16 --num-prompts 2000 --input-len 128 --output-len 128 --max-model-len 4096 --no-progress \
      --$loop --output-json "$OUT/bench_128_$loop.json" > "$OUT/bench_128_$loop.log" 2>&1
  grep -E "Output token|TTFT|TPOT|Error" "$OUT/bench_128_$loop.log" | head -6
done
[ -n "${SKIP_LONG:-}" ] && exit 0
echo "== meshlm bench throughput, Llama-3-8B shape, 1000/1000, 1000 prompts"
timeout 330 python3 -m meshlm bench throughput --model "$DIR" --load-format random --skip-tokenizer-init \
    --dtype bfloat16 --num-prompts 1000 --input-len 1000 --output-len 1000 --max-model-len 4096 --no-progress \
    --output-json "$OUT/bench_1000.json" > "$OUT/bench_1000.log" 2>&1
grep -E "throughput|TTFT|TPOT|Error" "$OUT/bench_1000.log" | head -12
