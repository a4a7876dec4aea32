#!/usr/bin/env bash
# On one GPU: the attention kernels at every tile and split count (attention_bench.py --sweep; the
# fastest per shape is printed last, to paste into decode_tiles / choose_num_splits and
# meshlm/kernels/attention_tiles.py), then whole-model prefill of the Llama-3-8B shape against the
# bf16 GEMM rate (gpu_bench.py --prefill). Each part fits one call of a few minutes: PART=decode,
# PART=prefill or PART=model runs one of them. Logs and JSON under $OUT.
# PART=variants (not part of all): the decode kernel's switches, tiles and split counts, bf16 KV
# and fp8 KV, timed as CUDA-graph replays at 1x32k, 8x8k, 256x1k and 1x512 (decode_variants.py,
# about 3 minutes).
# PART=prefill_sweep (not part of all): the prefill kernel's launch shapes and switches at 1x8k and
# 4x8k (prefill_sweep.py, about 3 minutes).
# Usage: OUT=results [PART=decode|prefill|model|variants|prefill_sweep] bash benchmarks/run_gpu_attention.sh
set -uo pipefail
OUT=${OUT:-out}; PART=${PART:-all}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
if [ "$PART" = all ] || [ "$PART" = decode ]; then
  echo "== decode attention, swept (attention_bench.py --sweep --prefill '')"
  timeout 280 python3 benchmarks/attention_bench.py --sweep --skip-flex --prefill "" \
      --out "$OUT/attention_sweep_decode.json" > "$OUT/attention_sweep_decode.log" 2>&1
  tail -24 "$OUT/attention_sweep_decode.log"
fi
if [ "$PART" = all ] || [ "$PART" = prefill ]; then
  echo "== prefill attention, swept (attention_bench.py --sweep --decode '')"
  timeout 280 python3 benchmarks/attention_bench.py --sweep --skip-flex --decode "" \
      --out "$OUT/attention_sweep_prefill.json" > "$OUT/attention_sweep_prefill.log" 2>&1
  tail -16 "$OUT/attention_sweep_prefill.log"
fi
if [ "$PART" = all ] || [ "$PART" = model ]; then
  echo "== whole-model prefill, Llama-3-8B shape (gpu_bench.py --prefill)"
  timeout 170 python3 benchmarks/gpu_bench.py --batches "" --prefill 1x8192,8x2048 --skip-hf \
      --out "$OUT/gpu_bench_prefill.json" > "$OUT/gpu_bench_prefill.log" 2>&1
  tail -6 "$OUT/gpu_bench_prefill.log"
fi
if [ "$PART" = variants ]; then
  echo "== decode attention: switches, tiles and split counts, bf16 and fp8 KV (decode_variants.py)"
  log="$OUT/decode_variants.log"
  timeout 220 python3 benchmarks/decode_variants.py --decode 1x32768,1x512,8x8192,256x1024 --max-seconds 160 \
      --out "$OUT/decode_variants.json" > "$log" 2>&1
  echo "exit $?"; grep -E "device-to-device|compiled|failed|skipped|WRONG" "$log" | head -12
  sed -n '/^[a-z]* KV, decode/,/^$/p' "$log" | head -60
  sed -n '/TB\/s (read + write); bf16 q/,$p' "$log"
fi
if [ "$PART" = prefill_sweep ]; then
  echo "== prefill kernel, launch shapes and switches (prefill_sweep.py)"
  timeout 230 python3 benchmarks/prefill_sweep.py --max-seconds 180 --out "$OUT/prefill_sweep.json" \
      > "$OUT/prefill_sweep.log" 2>&1
  echo "exit $?"; grep -E "compiled|failed" "$OUT/prefill_sweep.log" | head -8
  sed -n '/bf16 matmul .* TFLOP\/s; 32 heads/,$p' "$OUT/prefill_sweep.log"
fi
