#!/usr/bin/env bash
# Several GPUs of one host (H200 x2/x4/x8): the multi-rank GPU tests, then the multi-GPU benchmarks,
# on as many GPUs as the machine has. One part a call, each under ten minutes:
#   PART=tests    tests/gpu_multi: each rank on cuda:<local rank>, NCCL collectives against MPI,
#                 clean exit after destroying NCCL, a killed rank ending the job (2 and 4 ranks)
#   PART=layouts  tests/gpu_multi: tp=2, pp=2, tp=4, tp=2 x pp=2 against one GPU (fp32 and bf16),
#                 CUDA graphs at tp=2
#   PART=moe      tests/gpu_multi: a small Mixtral at tp=2 x ep=2, tp=4 x ep=2, tp=4 x ep=4 against one GPU
#   PART=bench    NCCL all-reduce of one layer's payload at 2, 4, 8 GPUs, then benchmarks/gpu_layouts.py
#                 (Llama-3-8B shape, bf16: decode steps at batch 1 and 64, agreement with tp=1) at tp=1,
#                 2, 4, 8, pp=2 and tp=2 x pp=2, those the GPUs and the time left allow
# Tests a machine has too few GPUs for are skipped, saying how many they need; the summary lists them.
# Logs (and pytest's JUnit XML) under $OUT; a short summary is printed last.
# Usage: OUT=results PART=tests bash benchmarks/run_gpu_multi.sh
set -uo pipefail
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/meshlm-multi}; PART=${PART:-tests}; mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# Open MPI started as root (the lent machines): allowed by its environment variables, for the
# tests' own mpiexec calls as for mpirun below
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=${PY:-python3}
NGPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
nvidia-smi -L
echo "commit ${COMMIT:-unknown}; $NGPUS GPUs; part $PART"
# The tests launch the mpiexec beside the interpreter; elsewhere, the one on the PATH.
if [ ! -x "$(dirname "$(command -v "$PY")")/mpiexec" ] && [ -z "${MESHLM_MPIEXEC:-}" ]; then
  MESHLM_MPIEXEC=$(command -v mpiexec || command -v mpirun || true); export MESHLM_MPIEXEC
  echo "mpiexec: ${MESHLM_MPIEXEC:-none found}"
fi
SUMMARY="$OUT/summary_$PART.txt"; : > "$SUMMARY"
PART_LIMIT_S=${PART_LIMIT_S:-570}  # the whole part stays inside one ten-minute call
note() { echo "$*" | tee -a "$SUMMARY"; }
fits() { [ $((SECONDS + $1)) -le "$PART_LIMIT_S" ]; }  # would a step of $1 seconds still fit?

tests() {  # name, seconds, then pytest arguments
  local name=$1 limit=$2; shift 2
  echo "== pytest $name"
  timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/junit_$name.xml" "$@" \
      > "$OUT/pytest_$name.log" 2>&1
  local code=$?
  note "pytest $name: exit $code ($( [ $code = 124 ] && echo "ran out of $limit s" || tail -1 "$OUT/pytest_$name.log"))"
  grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest_$name.log" | head -30 | tee -a "$SUMMARY"
}

layout() {  # ranks, name, then gpu_layouts.py arguments; skipped when the machine has fewer GPUs
  local n=$1 name=$2; shift 2
  if [ "$n" -gt "$NGPUS" ]; then note "$name: skipped, needs $n GPUs"; return; fi
  if ! fits 90; then note "$name: skipped, no time left in this part"; return; fi
  local launch=()
  [ "$n" -gt 1 ] && launch=(mpirun --oversubscribe -x PYTHONPATH -x PYTHONUNBUFFERED -x NCCL_NVLS_ENABLE
                            -x TORCH_SYMM_MEM_DISABLE_MULTICAST -n "$n")
  echo "== gpu_layouts.py $name"
  timeout 90 "${launch[@]}" "$PY" benchmarks/gpu_layouts.py "$@" --out "$RUNS/$name.json" > "$OUT/layout_$name.log" 2>&1
  note "$name: exit $? $(grep -E "decode step" "$OUT/layout_$name.log" | tr '\n' ' ')"
}

case "$PART" in
tests)
  tests tests "$PART_LIMIT_S" tests/gpu_multi/test_nccl_collectives.py tests/gpu_multi/test_gpu_rank_failures.py \
      tests/unit/test_gpu_multi_agreement.py
  ;;
layouts)
  tests layouts "$PART_LIMIT_S" tests/gpu_multi/test_gpu_layouts_multi.py -k "not moe"
  ;;
moe)
  tests moe "$PART_LIMIT_S" tests/gpu_multi/test_gpu_layouts_multi.py -k moe
  ;;
bench)
  [ "$NGPUS" -ge 1 ] || { echo "PART=bench needs GPUs; nvidia-smi lists none"; exit 1; }
  rm -f "$RUNS"/*.json
  for n in 2 4 8; do  # cheap, first
    [ "$n" -gt "$NGPUS" ] && continue
    fits 40 || { note "all-reduce $n GPUs: skipped, no time left in this part"; continue; }
    timeout 40 mpirun --oversubscribe -x PYTHONPATH -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -n $n \
        "$PY" benchmarks/nccl_allreduce.py > "$OUT/allreduce_$n.log" 2>&1
    note "all-reduce $n GPUs: exit $?"; grep "all-reduce" "$OUT/allreduce_$n.log" | tee -a "$SUMMARY"
  done
  layout 1 tp1
  layout 2 tp2 --tp 2
  layout 4 tp4 --tp 4
  layout 8 tp8 --tp 8
  layout 2 pp2 --pp 2
  layout 4 tp2pp2 --tp 2 --pp 2
  files=(); for name in tp1 tp2 pp2 tp4 tp2pp2 tp8; do [ -f "$RUNS/$name.json" ] && files+=("$RUNS/$name.json"); done
  if [ -f "$RUNS/tp1.json" ]; then
    "$PY" benchmarks/gpu_layouts.py --compare "${files[@]}" > "$OUT/compare.txt" 2>&1
    cat "$OUT/compare.txt" >> "$SUMMARY"
  fi
  ;;
*)
  echo "PART=$PART: choose tests, layouts, moe or bench"; exit 2
  ;;
esac
echo "== summary ($PART, $NGPUS GPUs)"
cat "$SUMMARY"
