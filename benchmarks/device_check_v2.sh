#!/usr/bin/env bash
# Lightning-attention device check v2 (chunk-parallel forward) for ONE single-GPU machine, ≤ ~200 s expected;
# the per-section limits add up to 230 s (machine start not included):
#   0. environment (GPU, versions)                                                              (≤ 10 s)
#   1. compiled correctness of the chunk-parallel forward: T=1000 fp32 + initial state, T=4097 bf16, T=257
#      bf16; fwd+bwd through the custom_vjp at T=777 fp32 (all vs the naive reference)            (≤ 50 s)
#   2. forward at T = 16384, 4096, 65536 (batch 1, 64 heads x 128, bf16): chunk-parallel Pallas, sequential
#      Pallas (its best sweep setting), XLA blocked; fwd+bwd at 16384; chunk tiling variants at 16384  (≤ 90 s)
#   3. flash-linear-attention chunk_simple_gla, forward at T = 16384, 65536, 4096 (torch process)  (≤ 70 s)
#   4. one combined markdown table with ratios vs fla                                              (≤ 10 s)
# Each section is time-limited and a failing one does not stop the others; every measurement is appended at
# once to JSON-lines files, so a section cut by its limit keeps what it measured. Output goes to stdout and,
# with $OUT set, to $OUT/device_check_v2.log (+ the .jsonl result files).
#
#   bash benchmarks/device_check_v2.sh              # on the GPU machine
#   bash benchmarks/device_check_v2.sh --dry-run    # CPU rehearsal: interpret mode, tiny sizes, torch stand-in
#                                                   # for fla when there is no CUDA (PYTHON=/work/venv/bin/python)
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ -n "${OUT:-}" ]; then
  RESULTS="$OUT"
else
  RESULTS=$(mktemp -d /tmp/device_check_v2.XXXXXX)
fi
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/device_check_v2.log") 2>&1
PY=${PYTHON:-python3}
JAX_JSON="$RESULTS/v2_jax.jsonl"
FLA_JSON="$RESULTS/v2_fla.jsonl"
rm -f "$JAX_JSON" "$FLA_JSON"
START=$(date +%s)
if [ $DRY -eq 1 ]; then
  SMALL="--small"
  # interpret mode on the CPU is slow: generous limits (the GPU run keeps the real ones)
  L_ENV=60; L_CHECK=600; L_BENCH=900; L_FLA=300; L_TABLE=60; B_BENCH=800
  FLA_LENGTHS="512,256,1024"
else
  SMALL=""
  L_ENV=10; L_CHECK=50; L_BENCH=90; L_FLA=70; L_TABLE=10   # 230 s in all
  B_BENCH=70   # section 2 starts no new measurement after 70 s (one more compile + 21 runs fit in the rest)
  FLA_LENGTHS="16384,65536,4096"
fi
echo "results in $RESULTS (dry run: $DRY)"

run() {  # run <title> <limit seconds> <command...>
  local title=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo; echo "################ $title (limit ${limit}s)"
  timeout --signal=TERM --kill-after=5 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! $title: timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "!! $title: exit code $rc"
  echo "################ $title: $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - START ))s)"
}

run "environment" $L_ENV bash -c '
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  '"$PY"' -c "
import sys
from importlib import metadata
print(\"python\", sys.version.split()[0])
for name in (\"jax\", \"jaxlib\", \"jax-cuda12-plugin\", \"jax-cuda13-plugin\", \"torch\", \"triton\", \"einops\"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, \"not installed\")
"'

run "1. chunk-parallel compiled correctness" $L_CHECK \
  $PY benchmarks/lightning_kernels.py --v2-check --json "$JAX_JSON" $SMALL
run "2. forward timings, fwd+bwd, chunk tilings" $L_BENCH \
  $PY benchmarks/lightning_kernels.py --v2-bench --repeat 10 --budget-s $B_BENCH --json "$JAX_JSON" $SMALL

FLA_ARGS="--fla --fwd-only --lengths $FLA_LENGTHS --warmup 1 --repeat 10 --json $FLA_JSON $SMALL"
if [ $DRY -eq 1 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  FLA_ARGS="$FLA_ARGS --standin"
fi
# fla-core alone has fla.ops (the flash_linear_attention wheel adds fla.layers/models, which pull transformers);
# it is installed inside the section, under its time limit.
export FLA_SITE=/tmp/fla_site_v2 PY FLA_ARGS
run "3. fla chunk_simple_gla" $L_FLA bash -c '
  rm -rf "$FLA_SITE"
  if ls .whl/fla_core-*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --target "$FLA_SITE" .whl/fla_core-*.whl; then
    export PYTHONPATH="$PYTHONPATH:$FLA_SITE"
  else
    echo "!! fla-core wheel (.whl/fla_core-*.whl) missing or not installable"
  fi
  exec $PY benchmarks/lightning_kernels.py $FLA_ARGS'

run "4. combined table" $L_TABLE $PY benchmarks/lightning_kernels.py --combine "$JAX_JSON" "$FLA_JSON"
echo; echo "################ device check v2 done in $(( $(date +%s) - START ))s"
