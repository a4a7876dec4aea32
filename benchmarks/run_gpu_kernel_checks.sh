#!/usr/bin/env bash
# One GPU, the kernels' defaults and the engine's throughput, in parts that each fit one call:
#   PART=tests    GPU tests of the decode (bf16 and fp8 pools) and prefill kernels' defaults, the
#                 decode kernel's sum_at_end switch, the fused norm / SiLU float8 output (~2.5 min)
#   PART=kernels  decode and prefill attention at the defaults as CUDA-graph replays (bf16 and fp8
#                 pools; prefill also 4 x 2k and the step's own keys read apart), batch-1 decode
#                 steps (bf16, FP8), FP8 steps at batch 256 and 1024 with and without the fused
#                 float8 norm / SiLU output (~4 min)
#   PART=bench    meshlm bench throughput: bf16 128/128 x 2000, FP8 128/128 x 2000 (FP8 KV), FP8
#                 1000/1000 x 1000 (FP8 KV, guaranteed_no_evict), bf16 2048/128 x 1000 (~8 min)
#   PART=engine   rank 0's host time per step (host_overhead.py), the bf16 small-batch GEMM's GPU
#                 tests, decode steps with their GPU busy fraction (bf16 at 1, 64, 256, 1024; FP8
#                 weights and KV at 1024 and 1712), bench FP8 and bf16 128/128 x 2000 (~7 min)
#   PART=steps    GPU tests of in-flight steps (mixed decode and prefill batches over bf16 and fp8
#                 pools; decode graphs against eager steps), then bench FP8 and bf16 128/128 x 2000
#                 and FP8 1000/1000 x 1000 (FP8 KV, guaranteed_no_evict) (~8 min)
#   PART=mixed    the kernels of mixed steps without PDL (FP8: 1700 decodes + 6400 prompt tokens;
#                 bf16: 256 decodes of 2k context + 6144 prompt tokens), bench FP8 128/128 (~5 min)
#   PART=accum    FP8 products with and without torch._scaled_mm's fast accumulation: its GPU test,
#                 FP8 decode steps at 1712 and mixed steps (1700 decodes + 6400 prompt tokens); then
#                 bench FP8 128/128 and bf16 2048/128 with steps of 16384 tokens (--max-num-tokens) (~8 min)
#   PART=batch1   GPU tests of the gated small-batch product (SiLU inside the down projection), then
#                 batch-1 decode steps (bf16, FP8 weights): the recorded small-batch GEMM shapes as
#                 they are, with SiLU inside the down projection (--fused-silu-product), and with
#                 every split product adding its splits in the kernel too (serial_reduce: one launch
#                 fewer a layer for qkv) (~5 min)
#   PART=parts    a long-prompt step's parts apart (step_parts.py: GEMMs by rows and BLAS library, a mixed
#                 step's attention on one and two streams), then bf16 mixed steps' kernels (~5 min)
#   PART=counters  decode attention at 1 x 32k and 256 x 1k under Nsight Compute (decode_counters.py), SDPA's
#                 kernels beside, then bench bf16 2048/128 x 1000 with guaranteed_no_evict (~6 min)
#   PART=grid     decode attention 1 x 32k over a grid of launch shapes, shuffled and ordered block tables
#                 (decode_counters.py --grid, ~5 min)
#   PART=prefill2k  the prefill kernel's launch shapes at 3 x 2k and 1 x 8k by descriptors, graph-timed (~6 min)
#   PART=prefill128  GPU tests of the prefill kernel and its entry point, attention at the defaults (bf16 KV),
#                 then bench bf16 2048/128 x 1000 (~7 min)
#   PART=prefill128tests  GPU tests of long contexts (32k in chunks against transformers), the engine's
#                 eager and graph steps and mixed attention batches (~7 min)
#   PART=prefill1k  prefill attention at 4 x 1k and 2 x 4k: unified and prefill kernels, the prefill kernel's
#                 launch shapes (~4 min)
#   PART=tma      GPU tests of the descriptor decode kernel and of the prefill kernel's entry point, the
#                 descriptor kernel's launch shapes at 1 x 32k and 8 x 8k against the default and SDPA
#                 (decode_counters.py --tma-grid), prefill attention at 1k-2k prompts: both kernels (~8 min)
#   PART=threshold  GPU tests of the engine's steps and mixed attention batches, prefill attention at
#                 256-1000-token prompts (both kernels), then bench bf16 1024/128 x 1000 with the prefill
#                 kernel from 1024-token queries (the default) and from 2048 (edited for the run) (~8 min)
#   PART=threshold512  GPU tests of the prefill kernel's entry point and of the engine's steps, prefill
#                 attention at 512 and 1k prompts, then bench bf16 2048/128 x 1000 and bf16 512/128 x 2000
#                 with the prefill kernel from 512-token queries (the default) and from 2048 (~9 min)
#   PART=decodeparts  decode attention's split and merge kernels apart and the merge inside the split kernel
#                 at 1 x 32k and 8 x 8k (decode_counters.py --parts), then the four products at 6400 rows
#                 whole and in row pieces under sustained load (step_parts.py --sustained) (~3 min)
#   PART=fused32k  decode attention 1 x 32k at few splits merged inside the split kernel and by the merge
#                 kernel, against the default and SDPA (decode_counters.py --fused-grid) (~3 min)
#   PART=shortkv  GPU tests of the prefill kernel and its entry point, then prefill attention at 256-2k prompts
#                 as the engine runs it (the step's keys by pointers below TMA_MIN_TOKENS) (~2 min)
#   PART=rows     GPU tests of the per-row float8 quantization (the scale's reciprocal) and the fused
#                 norm / SiLU float8 output, then the fused row kernels against the copy rate at
#                 1712 and 8100 rows, the float8 ones at 4, 8, 16 and 32 warps, the row quantizer in one
#                 pass (default) and in two (row_kernels_bench.py) (~3 min)
#   PART=fastacc  GPU tests of the per-row quantization and of the FP8 product with fast accumulation,
#                 FP8 decode steps at 1712 with and without it, the fused row kernels' timings, then
#                 bench FP8 128/128 as it is, with fast accumulation (the default edited for the run,
#                 restored after), and with it and steps of 16384 tokens (~9 min)
#   PART=bf16     bench bf16 2048/128 x 1000 with steps of 16384 tokens, bf16 128/128 x 2000 (~4 min)
#   PART=fp8      the FP8 product's error with and without fast accumulation (fp8_accumulation.py),
#                 the FP8 GPU tests, then bench FP8 128/128 (at 8192 and 16384 tokens a step) and
#                 1000/1000 (guaranteed_no_evict), FP8 KV (~8 min)
#   PART=busy     bench bf16 1000/1000 x 1000, decode steps with the GPU's busy fraction (bf16 at 1,
#                 64, 256 and 1024) (~4 min)
#   PART=defaults_fp8  the activations' and the sampler's peak memory at the default steps against
#                 their reserve (activation_peak.py, bf16), then bench FP8 1000/1000 (FP8 KV,
#                 guaranteed_no_evict) and FP8 128/128 at the defaults (~5 min)
#   PART=defaults_bf16  bench bf16 1000/1000, 128/128 and 2048/128 at the defaults (~5 min)
#   PART=ab_fp8   the GPU test of the step's reserve (test_step_reserve_gpu.py), then bench FP8 128/128
#                 at 8192 tokens a step and at the default (16384 on an H200), one machine (~4 min)
#   PART=ab_bf16  bench bf16 1000/1000 at 8192 tokens a step and at the default (~5 min)
#   PART=gated    GPU tests of the one-row product's fused ends (SiLU-and-mul after gate/up, rotary and the
#                 cache's store after QKV), products, fused ops, graphs, engine; decode steps of 1 and 2 rows
#                 with both, with the first only and with neither, twice (~8 min)
#   PART=gemv     GPU tests of the one-row product and of the small-batch product's recorded shapes,
#                 then decode steps of 1 and 16 rows (bf16 and FP8 weights) with the one-row
#                 product's recorded shapes and without them (~6 min)
#   PART=small    GPU tests of the one-row and small-batch products, the decode graphs and the engine,
#                 then bf16 and FP8 decode steps of 1, 2, 4 and 16 rows with decode attention's splits
#                 merged in a second kernel and inside the split kernel (--fused-merge) (~6 min)
#   PART=policy   bench bf16 1000/1000 with guaranteed_no_evict and at the defaults, FP8 128/128 at
#                 8192 tokens a step and at the default (~9 min)
#   PART=tokens16k  bench with steps of 16384 tokens (--max-num-tokens): FP8 1000/1000 (FP8 KV,
#                 guaranteed_no_evict), bf16 128/128 and 1000/1000 (~5 min)
#   PART=stages   GPU tests of the one-row product, then gemv_bench.py's sweep (1-3 stages a program),
#                 the fastest recorded, and batch-1 decode steps (bf16, FP8) with the new records and
#                 the old ones (~8 min)
#   PART=onerow   the float8 one-row products swept at 1, 3 and 4 stages (the sweep's records come back in
#                 $OUT; the committed ones stay), PART=gated's GPU tests, then batch-1 decode steps (bf16,
#                 FP8 weights) at the defaults, two rounds (~8 min)
#   PART=norm     GPU tests of the norms inside the one-row products (kernels/one_row.py's SummedRow), then
#                 batch-1 decode steps (bf16, FP8 weights) with them and without, two rounds (~3 min)
#   PART=normblocks  PART=norm's GPU tests, then batch-1 decode steps (bf16, FP8 weights) with the norms
#                 inside both blocks' products, the attention's only, the MLP's only, and none, two
#                 rounds (~5 min)
#   PART=issue11  decode steps with the GPU's busy fraction (bf16 at 1, 64, 256, 1024), then bench bf16
#                 128/128 x 2000 (~3 min)
#   PART=normregress  with the norms inside the one-row products on (the default): the GPU tests of PART=gated
#                 and the step reserve's (~8 min)
#   PART=normsweep  PART=norm's GPU tests, the qkv and gate/up one-row products swept with the norm
#                 handed to them and without (gemv_bench.py --norm-in; bf16, float8; 1-2 stages, records
#                 unchanged), then batch-1 decode steps with the norms inside and without (~8 min)
# Logs and JSON under $OUT. Usage: OUT=results PART=<one of the parts above> bash benchmarks/run_gpu_kernel_checks.sh
set -uo pipefail
OUT=${OUT:-out}; PART=${PART:-kernels}; RUNS=${RUNS:-/tmp/meshlm-session}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L
batch1_steps() {  # name: batch-1 decode steps with bf16 and FP8 weights at the records in place
  local name=$1 q flags
  for q in bf16 fp8; do
    flags=""; [ "$q" = fp8 ] && flags="--quantization fp8"
    echo "== batch-1 decode steps, $q weights, $name"
    timeout 70 python3 benchmarks/profile_decode.py $flags --batches 1 --steps 40 --max-batch-size 4 \
        --out "$OUT/profile_${q}_$name.json" > "$RUNS/profile_${q}_$name.log" 2>&1
    echo "exit $?"; tail -1 "$RUNS/profile_${q}_$name.log" | cut -c1-150
  done
}
norm_steps() {  # rounds, then the flag sets compared: batch-1 decode steps with bf16 and FP8 weights
  local rounds=$1 round q flags norm name; shift
  for round in $(seq "$rounds"); do
    for q in bf16 fp8; do
      flags=""; [ "$q" = fp8 ] && flags="--quantization fp8"
      for norm in "$@"; do
        name=$(echo "$norm" | tr -d ' -')
        echo "== round $round: batch-1 decode steps, $q weights, $norm"
        timeout 70 python3 benchmarks/profile_decode.py $flags --batches 1 --steps 40 --max-batch-size 4 $norm \
            --out "$RUNS/profile_${q}_${name}_$round.json" > "$RUNS/profile_${q}_${name}_$round.log" 2>&1
        echo "exit $?"; tail -1 "$RUNS/profile_${q}_${name}_$round.log" | cut -c1-150
      done
    done
  done
}
tests_to_out() {  # name, time limit, then pytest's arguments; the log in $OUT, its summary printed
  local name=$1 limit=$2; shift 2
  echo "== GPU tests: $name"
  timeout "$limit" python3 -m pytest -q -rf -p no:cacheprovider "$@" > "$OUT/pytest_$name.log" 2>&1
  grep -E "^FAILED|passed|failed" "$OUT/pytest_$name.log" | tail -6; grep -m 3 -E "^E  " "$OUT/pytest_$name.log"
}
prefill_grid() {  # name, shapes, seconds: the prefill kernel's launch shapes by descriptors, graph replays
  local name=$1 shapes=$2 seconds=$3
  echo "== the prefill kernel's launch shapes at $shapes by descriptors, graph replays (prefill_sweep.py)"
  timeout $((seconds + 60)) python3 benchmarks/prefill_sweep.py --shapes "$shapes" --graph --tma-grid \
      --max-seconds "$seconds" --out "$OUT/prefill_sweep_$name.json" > "$OUT/prefill_sweep_$name.log" 2>&1
  echo "exit $?"; grep -v -i warn "$OUT/prefill_sweep_$name.log" | tail -16
}
if [ "$PART" = tests ]; then
  gpu_tests() {  # name, time limit, then pytest's arguments; the log stays in $RUNS, its summary printed
    local name=$1 limit=$2; shift 2
    echo "== GPU tests: $name"
    timeout "$limit" python3 -m pytest -q -rf -p no:cacheprovider "$@" > "$RUNS/pytest_$name.log" 2>&1
    grep -E "^FAILED|passed|failed" "$RUNS/pytest_$name.log" | tail -6; grep -m 3 -E "^E  " "$RUNS/pytest_$name.log"
  }
  gpu_tests decode_defaults 80 tests/gpu/test_decode_attention.py tests/gpu/test_fp8_kv_kernels.py -k "default and not sum_at_end"
  gpu_tests sum_at_end 50 -x tests/gpu/test_decode_attention.py -k "sum_at_end and not fused and not long"
  gpu_tests prefill 50 tests/gpu/test_prefill_kernel.py tests/gpu/test_prefill_attention.py -k "step_keys or 8k or entry"
  gpu_tests fused 50 tests/gpu/test_fused_ops_gpu.py tests/gpu/test_fused_ops_fp8_gpu.py tests/gpu/test_fp8_gpu.py \
      -k "quantized or float8 or rotary_and_cache or fused_quantization or row_quantization"
fi
if [ "$PART" = kernels ]; then
  for kv in auto fp8; do
    prefill=""; [ "$kv" = auto ] && prefill=4x2048,1x8192,4x8192
    echo "== attention at the defaults, $kv KV (attention_bench.py --graph)"
    timeout 75 python3 benchmarks/attention_bench.py --graph --skip-flex --prefill "$prefill" --kv-cache-dtype $kv \
        --decode 1x32768,8x8192,256x1024,1024x1024 --out "$OUT/attention_$kv.json" > "$OUT/attention_$kv.log" 2>&1
    grep -E "^(decode|prefill) " "$OUT/attention_$kv.log"
  done
  echo "== decode steps (profile_decode.py): batch 1 bf16 and FP8; FP8 256 and 1024, fused float8 output on / off"
  timeout 40 python3 benchmarks/profile_decode.py --batches 1 --steps 20 > "$OUT/profile_bf16.log" 2>&1
  tail -1 "$OUT/profile_bf16.log"
  for fused in fused-quantization no-fused-quantization; do
    timeout 60 python3 benchmarks/profile_decode.py --quantization fp8 --batches 1,256,1024 --steps 10 --$fused \
        > "$OUT/profile_fp8_$fused.log" 2>&1
    tail -3 "$OUT/profile_fp8_$fused.log"
  done
fi
if [ "$PART" = engine ]; then
  echo "== rank 0's host time per step (host_overhead.py, no model)"
  timeout 60 python3 benchmarks/host_overhead.py --json "$OUT/host_overhead.json" 2>&1 | tail -7
  echo "== GPU tests: the small-batch GEMM with bf16 weights, the recorded launch shapes"
  timeout 100 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_fp8_gemm_kernel.py -k "16_bit or recorded" \
      > "$RUNS/pytest_gemm.log" 2>&1
  grep -E "^FAILED|passed|failed" "$RUNS/pytest_gemm.log" | tail -6; grep -m 3 -E "^E  " "$RUNS/pytest_gemm.log"
  echo "== decode steps and the GPU's busy fraction (profile_decode.py): bf16; FP8 weights and KV"
  timeout 80 python3 benchmarks/profile_decode.py --batches 1,64,256,1024 --steps 20 --out "$OUT/profile_bf16.json" \
      > "$RUNS/profile_bf16.log" 2>&1
  tail -6 "$RUNS/profile_bf16.log"
  timeout 80 python3 benchmarks/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batches 1024,1712 \
      --steps 10 --out "$OUT/profile_fp8.json" > "$RUNS/profile_fp8.log" 2>&1
  tail -4 "$RUNS/profile_fp8.log"
fi
if [ "$PART" = mixed ]; then
  echo "== mixed steps, FP8 weights and KV: 1700 decodes of 128 + 6400 prompt tokens (no PDL)"
  timeout 120 python3 benchmarks/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batches 1700 \
      --prefill-tokens 6400 --steps 5 --no-pdl --kernel-table > "$RUNS/mixed_fp8.log" 2>&1
  grep -A 22 "kernels per step" "$RUNS/mixed_fp8.log"; tail -2 "$RUNS/mixed_fp8.log"
  echo "== mixed steps, bf16: 256 decodes of 2048 + 6144 prompt tokens (no PDL)"
  timeout 120 python3 benchmarks/profile_decode.py --batches 256 --prompt-len 2048 --prefill-tokens 6144 \
      --steps 5 --no-pdl --kernel-table > "$RUNS/mixed_bf16.log" 2>&1
  grep -A 22 "kernels per step" "$RUNS/mixed_bf16.log"; tail -2 "$RUNS/mixed_bf16.log"
fi
if [ "$PART" = parts ]; then
  echo "== a long-prompt step's parts (step_parts.py): GEMMs by rows and BLAS library, mixed-step attention"
  timeout 150 python3 benchmarks/step_parts.py --out "$OUT/step_parts.json" > "$OUT/step_parts.log" 2>&1
  echo "exit $?"; cat "$OUT/step_parts.log" | grep -v Warning | tail -40
  echo "== mixed steps, bf16: 256 decodes of 2048 + 6144 prompt tokens (no PDL, then PDL)"
  for pdl in no-pdl pdl; do
    timeout 120 python3 benchmarks/profile_decode.py --batches 256 --prompt-len 2048 --prefill-tokens 6144 \
        --steps 5 --$pdl --kernel-table > "$OUT/mixed_bf16_$pdl.log" 2>&1
    echo "exit $?"; grep -A 30 "kernels per step" "$OUT/mixed_bf16_$pdl.log" | cut -c1-200; tail -2 "$OUT/mixed_bf16_$pdl.log"
  done
fi
if [ "$PART" = counters ]; then
  echo "== decode attention 1 x 32k under Nsight Compute (decode_counters.py): meshlm's kernels, then SDPA's"
  for shape in 1x32768 256x1024; do
    timeout 200 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats --section LaunchStats -k "regex:decode|flash|combine|fmha" --launch-skip 2 \
        --launch-count 8 python3 benchmarks/decode_counters.py --shape $shape > "$OUT/ncu_$shape.log" 2>&1
    echo "exit $?"
    grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Grid Size|Block Size|L2 Hit|Stall|eager" \
        "$OUT/ncu_$shape.log" | cut -c1-160 | head -120
  done
fi
if [ "$PART" = grid ]; then
  echo "== decode attention 1 x 32k: the grid of launch shapes, shuffled and ordered tables (decode_counters.py --grid)"
  timeout 400 python3 benchmarks/decode_counters.py --grid --shape 1x32768 > "$OUT/grid_1x32768.log" 2>&1
  echo "exit $?"; grep -v -i warn "$OUT/grid_1x32768.log" | tail -30
fi
if [ "$PART" = prefill2k ]; then
  prefill_grid 2k 3x2048,1x8192 330
fi
if [ "$PART" = prefill128 ]; then
  tests_to_out prefill 200 tests/gpu/test_prefill_kernel.py tests/gpu/test_prefill_attention.py
  echo "== attention at the defaults, bf16 KV (attention_bench.py --graph)"
  timeout 90 python3 benchmarks/attention_bench.py --graph --skip-flex --prefill 3x2048,4x2048,1x8192,4x8192 \
      --decode 1x32768,256x1024 --out "$OUT/attention_auto.json" > "$OUT/attention_auto.log" 2>&1
  echo "exit $?"; grep -E "^(decode|prefill) " "$OUT/attention_auto.log"
fi
if [ "$PART" = prefill128tests ]; then
  tests_to_out long_context 240 tests/gpu/test_long_context_gpu.py
  tests_to_out engine 180 tests/gpu/test_engine_gpu.py tests/gpu/test_triton_attention.py -k "agree or mixed"
fi
if [ "$PART" = prefill1k ]; then
  echo "== prefill attention at 1k and 4k prompts: the unified kernel and the prefill kernel (attention_bench.py --graph)"
  timeout 60 python3 benchmarks/attention_bench.py --graph --skip-flex --decode "" --prefill 4x1024,2x4096 \
      --out "$OUT/attention_1k.json" > "$OUT/attention_1k.log" 2>&1
  echo "exit $?"; grep -E "^prefill " "$OUT/attention_1k.log"
  prefill_grid 1k 4x1024,2x4096 170
fi
if [ "$PART" = tma ]; then
  tests_to_out decode_tma 120 tests/gpu/test_decode_tma.py
  tests_to_out prefill_entry 200 tests/gpu/test_prefill_kernel.py
  for shape in 1x32768 8x8192; do
    echo "== the descriptor decode kernel's launch shapes at $shape (decode_counters.py --tma-grid)"
    timeout 200 python3 benchmarks/decode_counters.py --tma-grid --shape $shape > "$OUT/tma_grid_$shape.log" 2>&1
    echo "exit $?"; grep -v -i warn "$OUT/tma_grid_$shape.log" | tail -26
  done
  echo "== prefill attention at 1k-2k prompts: the unified kernel and the prefill kernel (attention_bench.py --graph)"
  timeout 90 python3 benchmarks/attention_bench.py --graph --skip-flex --decode "" \
      --prefill 1x1024,2x1024,1x1536,1x2048 --out "$OUT/attention_1k2k.json" > "$OUT/attention_1k2k.log" 2>&1
  echo "exit $?"; grep -E "^prefill " "$OUT/attention_1k2k.log"
fi
if [ "$PART" = threshold ]; then
  tests_to_out engine 180 tests/gpu/test_engine_gpu.py tests/gpu/test_triton_attention.py -k "agree or mixed"
  echo "== prefill attention below 1k prompts: the unified kernel and the prefill kernel (attention_bench.py --graph)"
  timeout 90 python3 benchmarks/attention_bench.py --graph --skip-flex --decode "" \
      --prefill 1x256,1x512,4x512,1x768,1x1000,8x1000 --out "$OUT/attention_short.json" > "$OUT/attention_short.log" 2>&1
  echo "exit $?"; grep -E "^prefill " "$OUT/attention_short.log" | grep -v sdpa | cut -c1-110
fi
if [ "$PART" = threshold512 ]; then
  tests_to_out prefill_entry 200 tests/gpu/test_prefill_kernel.py
  tests_to_out engine 180 tests/gpu/test_engine_gpu.py tests/gpu/test_triton_attention.py -k "agree or mixed"
  echo "== prefill attention at 512 and 1k prompts: the kernel the engine picks (attention_bench.py --graph)"
  timeout 90 python3 benchmarks/attention_bench.py --graph --skip-flex --decode "" \
      --prefill 1x256,1x512,4x512,1x1000 --out "$OUT/attention_512.json" > "$OUT/attention_512.log" 2>&1
  echo "exit $?"; grep -E "^prefill " "$OUT/attention_512.log" | grep -v sdpa | cut -c1-110
fi
if [ "$PART" = decodeparts ]; then
  for shape in 1x32768 8x8192; do
    echo "== decode attention at $shape: the default launch's kernels apart (decode_counters.py --parts)"
    timeout 120 python3 benchmarks/decode_counters.py --parts --shape $shape > "$OUT/parts_$shape.log" 2>&1
    echo "exit $?"; grep -v -i warn "$OUT/parts_$shape.log" | tail -7
  done
  echo "== the four products at 6400 rows, whole and in row pieces, sustained (step_parts.py --sustained)"
  timeout 120 python3 benchmarks/step_parts.py --sustained > "$OUT/sustained.log" 2>&1
  echo "exit $?"; tail -7 "$OUT/sustained.log"
fi
if [ "$PART" = fused32k ]; then
  echo "== decode attention 1 x 32k, few splits, the merge inside (decode_counters.py --fused-grid)"
  timeout 300 python3 benchmarks/decode_counters.py --fused-grid --shape 1x32768 > "$OUT/fused_1x32768.log" 2>&1
  echo "exit $?"; grep -v -i warn "$OUT/fused_1x32768.log" | tail -26
fi
if [ "$PART" = shortkv ]; then
  tests_to_out prefill_entry 200 tests/gpu/test_prefill_kernel.py
  echo "== prefill attention at 256-2k prompts as the engine runs it (attention_bench.py --graph)"
  timeout 90 python3 benchmarks/attention_bench.py --graph --skip-flex --decode "" \
      --prefill 1x256,1x512,4x512,1x1000,1x1024,2x1024 --out "$OUT/attention_shortkv.json" \
      > "$OUT/attention_shortkv.log" 2>&1
  echo "exit $?"; grep -E "^prefill " "$OUT/attention_shortkv.log" | grep -v sdpa | cut -c1-110
fi
if [ "$PART" = rows ]; then
  echo "== GPU tests: per-row float8 quantization, fused norm / SiLU float8 output"
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gpu.py tests/gpu/test_fused_ops_gpu.py tests/gpu/test_fused_ops_fp8_gpu.py \
      -k "row_quantization or row_quantizer or quantized or float8" 2>&1 | tail -2
  echo "== fused row kernels (CUDA-graph replays)"
  timeout 240 python3 benchmarks/row_kernels_bench.py --out "$OUT/row_kernels.json" 2>&1 | tail -20
  exit 0
fi
if [ "$PART" = batch1 ]; then
  echo "== GPU tests: the gated small-batch product"
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gemm_kernel.py tests/gpu/test_fp8_gpu.py \
      -k "gated or fuses_silu or silu_inside" 2>&1 | tail -2
  for reduce in recorded fused serial; do
    silu=""; [ "$reduce" = recorded ] || silu="--fused-silu-product"
    if [ "$reduce" = serial ]; then  # edit the recorded shapes for this run, restored below
      rm -rf "$RUNS/configs.orig"; cp -r meshlm/kernels/configs "$RUNS/configs.orig"
      python3 - <<'PY'
import json, pathlib
for path in pathlib.Path("meshlm/kernels/configs").glob("*_weight_gemm_NVIDIA_H200.json"):
    data = json.loads(path.read_text())
    for entry in data["entries"]:
        if entry["tiles"]["split_k"] > 1:
            entry["tiles"]["serial_reduce"] = True
    path.write_text(json.dumps(data, indent=1))
PY
    fi
    for q in bf16 fp8; do
      flags=""; [ "$q" = fp8 ] && flags="--quantization fp8"
      echo "== batch 1, $q weights, $reduce (unprofiled ms in the table's 3rd column)"
      timeout 60 python3 benchmarks/profile_decode.py --batches 1 --steps 30 $flags $silu 2>&1 | tail -1
    done
  done
  cp "$RUNS/configs.orig"/*.json meshlm/kernels/configs/
  exit 0
fi
if [ "$PART" = accum ]; then
  echo "== GPU tests: FP8 products, fast accumulation"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gpu.py -k "emulation" 2>&1 | tail -2
  for accum in no-fast-accumulation fast-accumulation; do
    echo "== FP8 weights and KV, --$accum: decode steps at 1712, then mixed steps (unprofiled ms, then top kernels)"
    timeout 100 python3 benchmarks/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batches 1712 \
        --steps 10 --$accum > "$RUNS/accum_decode_$accum.log" 2>&1
    tail -1 "$RUNS/accum_decode_$accum.log"
    timeout 100 python3 benchmarks/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batches 1700 \
        --prefill-tokens 6400 --steps 5 --$accum > "$RUNS/accum_mixed_$accum.log" 2>&1
    tail -1 "$RUNS/accum_mixed_$accum.log"
  done
fi
if [ "$PART" = fastacc ]; then
  echo "== GPU tests: per-row float8 quantization, fused norm / SiLU float8 output, FP8 products with fast accumulation"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gpu.py tests/gpu/test_fused_ops_gpu.py tests/gpu/test_fused_ops_fp8_gpu.py \
      -k "row_quantization or row_quantizer or quantized or float8 or emulation" 2>&1 | tail -2
  for accum in no-fast-accumulation fast-accumulation; do
    echo "== FP8 weights and KV, --$accum: decode steps at 1712 (unprofiled ms in the table's 3rd column)"
    timeout 80 python3 benchmarks/profile_decode.py --quantization fp8 --kv-cache-dtype fp8 --batches 1712 \
        --steps 10 --$accum 2>&1 | tail -1
  done
  echo "== fused row kernels (CUDA-graph replays)"
  timeout 120 python3 benchmarks/row_kernels_bench.py --rows 1712,8100 --warps 4,8,16 --out "$OUT/row_kernels.json" 2>&1 | tail -16
fi
if [ "$PART" = fp8 ]; then
  echo "== the FP8 product's error (fp8_accumulation.py)"
  timeout 60 python3 benchmarks/fp8_accumulation.py 2>&1 | tail -5
  echo "== GPU tests: FP8 products and models, fused norm / SiLU float8 output"
  timeout 200 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_fp8_gpu.py tests/gpu/test_fused_ops_gpu.py tests/gpu/test_fused_ops_fp8_gpu.py \
      -k "not fused_ops_gpu or quantized or float8 or row_quant or fused_quantization" > "$RUNS/pytest_fp8.log" 2>&1
  grep -E "^FAILED|passed|failed" "$RUNS/pytest_fp8.log" | tail -6; grep -m 3 -E "^E  " "$RUNS/pytest_fp8.log"
fi
if [ "$PART" = busy ] || [ "$PART" = issue11 ]; then
  echo "== decode steps and the GPU's busy fraction (profile_decode.py), bf16"
  timeout 80 python3 benchmarks/profile_decode.py --batches 1,64,256,1024 --steps 20 --out "$OUT/profile_bf16.json" \
      > "$RUNS/profile_bf16.log" 2>&1
  tail -6 "$RUNS/profile_bf16.log"
fi
if [ "$PART" = steps ]; then
  steps_tests() {  # name, time limit, then pytest's arguments; prints the summary, or the log's end when cut
    local name=$1 limit=$2; shift 2
    echo "== GPU tests: $name"
    timeout "$limit" python3 -m pytest -q -rf -p no:cacheprovider "$@" > "$RUNS/pytest_$name.log" 2>&1
    grep -E "^FAILED|passed|failed|error|%\]$" "$RUNS/pytest_$name.log" | tail -6 || tail -c 400 "$RUNS/pytest_$name.log"
    grep -m 3 -E "^E  " "$RUNS/pytest_$name.log"
  }
  steps_tests attention 100 tests/gpu/test_triton_attention.py tests/gpu/test_fp8_kv_kernels.py \
      tests/gpu/test_prefill_kernel.py -k "decodes or mixed"
  steps_tests engine 150 tests/gpu/test_engine_gpu.py tests/gpu/test_graph_buckets_gpu.py -k "agree or replays"
fi
if [ "$PART" = small ]; then
  echo "== GPU tests: the one-row and small-batch products, the decode graphs (short-context ones too), the engine"
  timeout 240 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_gemv_kernel.py tests/gpu/test_fp8_gemm_kernel.py \
      tests/gpu/test_graph_buckets_gpu.py tests/gpu/test_engine_gpu.py tests/gpu/test_verify_graphs_gpu.py \
      > "$OUT/pytest_small.log" 2>&1
  grep -E "^FAILED|passed|failed" "$OUT/pytest_small.log" | tail -6; grep -m 4 -E "^E  " "$OUT/pytest_small.log"
  for q in bf16 fp8; do
    flags=""; [ "$q" = fp8 ] && flags="--quantization fp8"
    for merge in no-fused-merge fused-merge; do
      echo "== decode steps of 1 to 16 rows, $q weights, --$merge"
      timeout 100 python3 benchmarks/profile_decode.py $flags --batches 1,2,4,16 --steps 50 --max-batch-size 16 \
          --$merge > "$OUT/profile_small_${q}_$merge.log" 2>&1
      echo "exit $?"; tail -4 "$OUT/profile_small_${q}_$merge.log" | cut -c1-110
    done
  done
fi
if [ "$PART" = onerow ]; then
  echo "== float8 one-row products swept (gemv_bench.py)"
  cp meshlm/kernels/configs/fp8_weight_gemv_NVIDIA_H200.json "$RUNS/fp8_gemv_committed.json"
  timeout 150 python3 benchmarks/gemv_bench.py --fp8 --stages 1,3,4 --write-config --out "$OUT/gemv_fp8.json" \
      > "$OUT/gemv_fp8.log" 2>&1
  echo "exit $?"; grep -v "^ *$" "$OUT/gemv_fp8.log" | tail -22; cp meshlm/kernels/configs/fp8_weight_gemv_* "$OUT/"
  # the tests and steps below run the committed records; the sweep's come back in $OUT
  cp "$RUNS/fp8_gemv_committed.json" meshlm/kernels/configs/fp8_weight_gemv_NVIDIA_H200.json
fi
if [ "$PART" = gated ] || [ "$PART" = onerow ] || [ "$PART" = normregress ]; then
  echo "== GPU tests: the one-row product (gated too, QKV with rotary), products, fused ops, decode graphs, engine"
  gated_tests() {  # name, time limit, then the test files; one pytest each (all in one reached 300 s once)
    local name=$1 limit=$2; shift 2
    timeout "$limit" python3 -m pytest -q -rf -p no:cacheprovider "$@" > "$RUNS/pytest_$name.log" 2>&1
    echo "$name (exit $?, 124: timed out): $(grep -E "passed|failed" "$RUNS/pytest_$name.log" | tail -1)"
    grep -m 4 -E "^E  " "$RUNS/pytest_$name.log"; tail -c 300 "$RUNS/pytest_$name.log" > "$OUT/pytest_${name}_end.txt"
  }
  gated_tests one_row 150 tests/gpu/test_gemv_kernel.py tests/gpu/test_qkv_rotary_kernel.py \
      tests/gpu/test_graph_buckets_gpu.py tests/gpu/test_engine_gpu.py
  gated_tests fp8 150 tests/gpu/test_fp8_gemm_kernel.py tests/gpu/test_fp8_gpu.py
  gated_tests fused 100 tests/gpu/test_fused_ops_gpu.py tests/gpu/test_fused_ops_fp8_gpu.py
  gated_tests fp8_kv 150 tests/gpu/test_fp8_kv_kernels.py
  [ "$PART" = normregress ] && gated_tests step_reserve 100 tests/gpu/test_step_reserve_gpu.py
fi
if [ "$PART" = onerow ]; then
  for round in 1 2; do batch1_steps "round_$round"; done
fi
if [ "$PART" = norm ] || [ "$PART" = normsweep ] || [ "$PART" = normblocks ]; then
  echo "== GPU tests: the norms inside the one-row products"
  timeout 150 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_norm_in_products.py \
      tests/gpu/test_norm_in_products_gpu.py > "$RUNS/pytest_norm.log" 2>&1
  echo "exit $?"; grep -E "^FAILED|passed|failed" "$RUNS/pytest_norm.log" | tail -6
  grep -m 6 -E "^E  " "$RUNS/pytest_norm.log"; tail -c 1500 "$RUNS/pytest_norm.log" > "$OUT/pytest_norm_end.txt"
fi
if [ "$PART" = normsweep ]; then
  for q in bf16 fp8; do
    flags=""; [ "$q" = fp8 ] && flags="--fp8"
    for norm in "" --norm-in; do
      echo "== qkv and gate/up one-row products swept, $q weights $norm (gemv_bench.py)"
      timeout 150 python3 benchmarks/gemv_bench.py $flags --shapes qkv,gate_up --stages 1,2,3 $norm \
          --out "$OUT/gemv_${q}${norm}.json" > "$RUNS/gemv_${q}${norm}.log" 2>&1
      echo "exit $?"; grep -v "^ *$" "$RUNS/gemv_${q}${norm}.log" | tail -9 | cut -c1-220
    done
  done
  norm_steps 1 --norm-in-products --no-norm-in-products
fi
[ "$PART" = normblocks ] && norm_steps 2 --norm-in-products "--norm-in-products --norm-in-blocks attention" \
    "--norm-in-products --norm-in-blocks mlp" --no-norm-in-products
[ "$PART" = norm ] && norm_steps 2 --norm-in-products --no-norm-in-products
if [ "$PART" = gated ]; then
  for round in 1 2; do
    for q in bf16 fp8; do
      flags=""; [ "$q" = fp8 ] && flags="--quantization fp8"
      for fused in "--gated-one-row --qkv-rotary-one-row" "--gated-one-row --no-qkv-rotary-one-row" \
                   "--no-gated-one-row --no-qkv-rotary-one-row"; do
        name=$(echo "$fused" | tr -d ' -' | sed 's/gatedonerow/g/; s/qkvrotaryonerow/r/g')
        echo "== round $round: decode steps of 1 and 2 rows, $q weights, $fused"
        timeout 100 python3 benchmarks/profile_decode.py $flags --batches 1,2 --steps 50 --max-batch-size 16 \
            $fused --out "$OUT/profile_${q}_${name}_$round.json" > "$RUNS/profile_${q}_${name}_$round.log" 2>&1
        echo "exit $?"; tail -2 "$RUNS/profile_${q}_${name}_$round.log" | cut -c1-100
      done
    done
  done
fi
if [ "$PART" = stages ]; then
  echo "== GPU tests: the one-row product, QKV with rotary"
  timeout 120 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_gemv_kernel.py \
      tests/gpu/test_qkv_rotary_kernel.py > "$OUT/pytest_stages.log" 2>&1
  grep -E "^FAILED|passed|failed" "$OUT/pytest_stages.log" | tail -6; grep -m 4 -E "^E  " "$OUT/pytest_stages.log"
  mkdir -p "$RUNS/configs.orig" && cp meshlm/kernels/configs/*_weight_gemv_* "$RUNS/configs.orig/"
  echo "== one-row products swept (gemv_bench.py), float8 then bf16 weights"
  timeout 200 python3 benchmarks/gemv_bench.py --fp8 --stages 1,2,3 --write-config \
      --out "$OUT/gemv_fp8.json" > "$OUT/gemv_fp8.log" 2>&1
  echo "exit $?"; grep -v "^ *$" "$OUT/gemv_fp8.log" | tail -32
  timeout 130 python3 benchmarks/gemv_bench.py --stages 1,2,3 --write-config --out "$OUT/gemv_bf16.json" \
      > "$OUT/gemv_bf16.log" 2>&1
  echo "exit $?"; grep -v "^ *$" "$OUT/gemv_bf16.log" | tail -20
  cp meshlm/kernels/configs/*_weight_gemv_* "$OUT/"
  for configs in new old; do
    [ "$configs" = old ] && cp "$RUNS/configs.orig"/* meshlm/kernels/configs/
    batch1_steps "${configs}_records"
  done
fi
if [ "$PART" = gemv ]; then
  echo "== GPU tests: the one-row product, the small-batch product's recorded shapes, FP8 layers"
  timeout 240 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_gemv_kernel.py tests/gpu/test_fp8_gemm_kernel.py \
      tests/gpu/test_fp8_gpu.py > "$OUT/pytest_gemv.log" 2>&1
  grep -E "^FAILED|passed|failed" "$OUT/pytest_gemv.log" | tail -6; grep -m 4 -E "^E  " "$OUT/pytest_gemv.log"
  for run in gemv small_batch; do
    [ "$run" = small_batch ] && mkdir -p "$RUNS/gemv_configs" && mv meshlm/kernels/configs/*_weight_gemv_* "$RUNS/gemv_configs/"
    for q in bf16 fp8; do
      flags=""; [ "$q" = fp8 ] && flags="--quantization fp8"
      echo "== decode steps, $q weights, one row by the $run product (profile_decode.py)"
      timeout 100 python3 benchmarks/profile_decode.py $flags --batches 1,16 --steps 50 --max-batch-size 16 \
          --out "$OUT/profile_${run}_$q.json" > "$OUT/profile_${run}_$q.log" 2>&1
      echo "exit $?"; tail -2 "$OUT/profile_${run}_$q.log"
    done
  done
  mv "$RUNS/gemv_configs/"* meshlm/kernels/configs/
fi
if [ "$PART" = defaults_fp8 ]; then
  echo "== peak memory of a step against its reserve, bf16, default steps (activation_peak.py)"
  timeout 150 python3 benchmarks/activation_peak.py > "$OUT/peak_bf16.log" 2>&1
  echo "exit $?"; tail -4 "$OUT/peak_bf16.log"
fi
if [ "$PART" = ab_fp8 ]; then
  echo "== GPU test: a step's memory within its reserve"
  timeout 200 python3 -m pytest -q -rf -p no:cacheprovider tests/gpu/test_step_reserve_gpu.py > "$OUT/pytest_reserve.log" 2>&1
  grep -E "^FAILED|passed|failed" "$OUT/pytest_reserve.log" | tail -4; grep -m 4 -E "^E  " "$OUT/pytest_reserve.log"
fi
[ "$PART" = policy ] || [ "$PART" = ab_fp8 ] || [ "$PART" = ab_bf16 ] || [ "$PART" = defaults_fp8 ] || [ "$PART" = defaults_bf16 ] || [ "$PART" = bench ] || [ "$PART" = engine ] || [ "$PART" = steps ] || [ "$PART" = mixed ] || [ "$PART" = accum ] \
    || [ "$PART" = fastacc ] || [ "$PART" = bf16 ] || [ "$PART" = fp8 ] || [ "$PART" = busy ] \
    || [ "$PART" = tokens16k ] || [ "$PART" = issue11 ] || [ "$PART" = counters ] || [ "$PART" = prefill128 ] \
    || [ "$PART" = threshold ] || [ "$PART" = threshold512 ] || exit 0
DIR=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from shapes import model_dir; print(model_dir('llama3-8b', '$RUNS/shape'))")
bench() {  # name, time limit, then the flags
  local name=$1 limit=$2; shift 2
  echo "== meshlm bench throughput $*"
  timeout "$limit" python3 -m meshlm bench throughput --model "$DIR" --load-format random --skip-tokenizer-init \
      --dtype bfloat16 --max-model-len 4096 --no-progress --output-json "$OUT/bench_$name.json" "$@" \
      > "$RUNS/bench_$name.log" 2>&1
  grep -E "Output token|TTFT|TPOT|Steps|Time in|Decode-only|Peak KV|Error" "$RUNS/bench_$name.log" | head -12
}
if [ "$PART" = steps ]; then
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  bench bf16_128 80 --num-prompts 2000 --input-len 128 --output-len 128
  bench fp8_1000_no_evict 150 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1000 --input-len 1000 \
      --output-len 1000 --capacity-scheduler-policy guaranteed_no_evict
  exit 0
fi
if [ "$PART" = prefill128 ]; then
  bench bf16_2048 150 --num-prompts 1000 --input-len 2048 --output-len 128
  exit 0
fi
if [ "$PART" = counters ]; then
  bench bf16_2048_no_evict 150 --num-prompts 1000 --input-len 2048 --output-len 128 \
      --capacity-scheduler-policy guaranteed_no_evict
  exit 0
fi
if [ "$PART" = accum ]; then
  bench fp8_128_16k 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128 \
      --max-num-tokens 16384
  bench bf16_2048_16k 130 --num-prompts 1000 --input-len 2048 --output-len 128 --max-num-tokens 16384
  exit 0
fi
if [ "$PART" = fp8 ]; then
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  bench fp8_128_16k 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128 \
      --max-num-tokens 16384
  bench fp8_1000_no_evict 150 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1000 --input-len 1000 \
      --output-len 1000 --capacity-scheduler-policy guaranteed_no_evict
  exit 0
fi
if [ "$PART" = tokens16k ]; then
  bench fp8_1000_no_evict_16k 150 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1000 --input-len 1000 \
      --output-len 1000 --capacity-scheduler-policy guaranteed_no_evict --max-num-tokens 16384
  bench bf16_128_16k 80 --num-prompts 2000 --input-len 128 --output-len 128 --max-num-tokens 16384
  bench bf16_1000_16k 200 --num-prompts 1000 --input-len 1000 --output-len 1000 --max-num-tokens 16384
  exit 0
fi
if [ "$PART" = ab_fp8 ]; then
  bench fp8_128_8k 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128 \
      --max-num-tokens 8192
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  exit 0
fi
if [ "$PART" = policy ]; then
  bench bf16_1000_no_evict 200 --num-prompts 1000 --input-len 1000 --output-len 1000 \
      --capacity-scheduler-policy guaranteed_no_evict
  bench bf16_1000 200 --num-prompts 1000 --input-len 1000 --output-len 1000
  bench fp8_128_8k 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128 \
      --max-num-tokens 8192
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  exit 0
fi
if [ "$PART" = ab_bf16 ]; then
  bench bf16_1000_8k 200 --num-prompts 1000 --input-len 1000 --output-len 1000 --max-num-tokens 8192
  bench bf16_1000 200 --num-prompts 1000 --input-len 1000 --output-len 1000
  exit 0
fi
if [ "$PART" = defaults_fp8 ]; then
  bench fp8_1000_no_evict 150 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1000 --input-len 1000 \
      --output-len 1000 --capacity-scheduler-policy guaranteed_no_evict
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  exit 0
fi
if [ "$PART" = defaults_bf16 ]; then
  bench bf16_1000 200 --num-prompts 1000 --input-len 1000 --output-len 1000
  bench bf16_128 80 --num-prompts 2000 --input-len 128 --output-len 128
  bench bf16_2048 130 --num-prompts 1000 --input-len 2048 --output-len 128
  exit 0
fi
if [ "$PART" = issue11 ]; then
  bench bf16_128 80 --num-prompts 2000 --input-len 128 --output-len 128
  exit 0
fi
if [ "$PART" = busy ]; then
  bench bf16_1000 200 --num-prompts 1000 --input-len 1000 --output-len 1000
  exit 0
fi
if [ "$PART" = bf16 ]; then
  bench bf16_2048_16k 130 --num-prompts 1000 --input-len 2048 --output-len 128 --max-num-tokens 16384
  bench bf16_128 80 --num-prompts 2000 --input-len 128 --output-len 128
  exit 0
fi
if [ "$PART" = fastacc ]; then
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  cp meshlm/kernels/fp8.py "$RUNS/fp8.py.orig"
  sed -i 's/^_FAST_ACCUMULATION = {"enabled": False}/_FAST_ACCUMULATION = {"enabled": True}/' meshlm/kernels/fp8.py
  grep -q '^_FAST_ACCUMULATION = {"enabled": True}' meshlm/kernels/fp8.py || echo "fast accumulation NOT switched on"
  bench fp8_128_fast 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  bench fp8_128_fast_16k 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 \
      --output-len 128 --max-num-tokens 16384
  cp "$RUNS/fp8.py.orig" meshlm/kernels/fp8.py
  exit 0
fi
from_2048() {  # name, time limit, then the flags: bench with the prefill kernel from 2048-token queries
  local name=$1 limit=$2; shift 2
  cp meshlm/kernels/prefill_tiles.py "$RUNS/prefill_tiles.py.orig"  # edited for the run, restored below
  sed -i 's/^PREFILL_MIN_QUERY_LEN = [0-9]*$/PREFILL_MIN_QUERY_LEN = 2048/' meshlm/kernels/prefill_tiles.py
  grep -q '^PREFILL_MIN_QUERY_LEN = 2048$' meshlm/kernels/prefill_tiles.py || echo "threshold NOT edited"
  bench "$name" "$limit" "$@"
  cp "$RUNS/prefill_tiles.py.orig" meshlm/kernels/prefill_tiles.py
}
if [ "$PART" = threshold ]; then
  bench bf16_1024 150 --num-prompts 1000 --input-len 1024 --output-len 128
  from_2048 bf16_1024_from2048 150 --num-prompts 1000 --input-len 1024 --output-len 128
  exit 0
fi
if [ "$PART" = threshold512 ]; then
  bench bf16_2048 150 --num-prompts 1000 --input-len 2048 --output-len 128
  bench bf16_512 120 --num-prompts 2000 --input-len 512 --output-len 128
  from_2048 bf16_512_from2048 120 --num-prompts 2000 --input-len 512 --output-len 128
  exit 0
fi
if [ "$PART" = mixed ]; then
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  exit 0
fi
if [ "$PART" = engine ]; then
  bench fp8_128 80 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
  bench bf16_128 80 --num-prompts 2000 --input-len 128 --output-len 128
  exit 0
fi
bench fp8_1000_no_evict 150 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1000 --input-len 1000 \
    --output-len 1000 --capacity-scheduler-policy guaranteed_no_evict
bench bf16_2048 130 --num-prompts 1000 --input-len 2048 --output-len 128
bench fp8_128 70 --quantization fp8 --kv-cache-dtype fp8 --num-prompts 2000 --input-len 128 --output-len 128
bench bf16_128 70 --num-prompts 2000 --input-len 128 --output-len 128
