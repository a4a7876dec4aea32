#!/usr/bin/env bash
# Mixtral-8x7B shape on 4 GPUs: expert parallel (ep=4) against tensor parallel experts (tp=4,
# moe_tp=4), in fp32 (agreement) and bf16 (agreement and decode step times).
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-moe}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
SHAPE=${SHAPE:-mixtral-8x7b}
M="mpirun --allow-run-as-root --oversubscribe -x PYTHONPATH -x PYTHONUNBUFFERED -x NCCL_NVLS_ENABLE"
run() { name=$1; shift; echo "== $name"
        timeout 200 $M -n 4 python3 benchmarks/gpu_layouts.py --shape "$SHAPE" --out "$RUNS/$name.json" "$@" > "$RUNS/$name.log" 2>&1
        grep -vE "^\[meshlm" "$RUNS/$name.log" | tail -4; }
run fp32_tp4 --tp 4 --dtype float32 --skip-timings
run fp32_tp4ep4 --tp 4 --ep 4 --dtype float32 --skip-timings
run bf16_tp4 --tp 4
run bf16_tp4ep4 --tp 4 --ep 4
python3 benchmarks/gpu_layouts.py --compare "$RUNS"/fp32_tp4.json "$RUNS"/fp32_tp4ep4.json "$RUNS"/bf16_tp4.json "$RUNS"/bf16_tp4ep4.json 2>&1 | tee "$OUT/compare_moe.txt"
python3 - "$RUNS" <<'PY' | tee -a "$OUT/compare_moe.txt"
import json, sys
runs = sys.argv[1]
for name in ("bf16_tp4", "bf16_tp4ep4"):
    try:
        r = json.load(open(f"{runs}/{name}.json"))
    except OSError:
        continue
    for t in r["timings"]:
        print(f"{name}: batch {t['batch']} decode step {t['decode_step_ms_median']:.2f} ms (p90 {t['decode_step_ms_p90']:.2f}), "
              f"TTFT {t['ttft_ms']:.0f} ms, {t['output_tok_s']:.0f} output tok/s")
PY
tar czf "$OUT/moe_runs.tgz" -C "$RUNS" . 2>/dev/null
