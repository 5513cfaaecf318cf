#!/usr/bin/env bash
# Lightning-attention device check for ONE single-GPU machine, < 8 minutes in all:
#   1. environment (devices, versions)
#   2. compiled (non-interpret) correctness of the Pallas kernels vs the references        (≤ 130 s)
#   3. benchmark tables: prefill fwd / fwd+bwd, decode; then a Pallas tiling sweep           (≤ 250 s)
#   4. flash-linear-attention chunk_simple_gla baseline, if its wheels are in .whl/           (≤ 75 s)
# Every section is time-limited and a failing one does not stop the others. With $OUT set, everything is also
# written to $OUT/device_check.log.
#
#   bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # pallas_kernels, benchmarks import from the repo root
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/device_check.log") 2>&1
fi
PY=${PYTHON:-python3}
START=$(date +%s)

run() {  # run <title> <timeout seconds> <command...>
  local title=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo; echo "################ $title (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! $title: timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "!! $title: exit code $rc"
  echo "################ $title: $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - START ))s)"
}

echo "################ environment"
date -u; uname -a
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -5
$PY - <<'EOF' 2>&1
import sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "jax_cuda13_plugin", "jax_cuda12_plugin", "torch", "triton", "einops"):
    try:
        mod = __import__(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__})")
import jax
print("devices:", jax.devices())
EOF

run "compiled correctness" 130 $PY benchmarks/lightning_kernels.py --check --no-bench
run "model with pallas vs xla lightning" 60 $PY benchmarks/device_model_check.py
run "benchmarks (prefill, decode, tiling sweep)" 230 $PY benchmarks/lightning_kernels.py --sweep

if ls .whl/*.whl >/dev/null 2>&1; then
  # fla-core alone has fla.ops; the flash_linear_attention wheel adds fla.layers/models (they pull transformers).
  WHEELS=$(ls .whl/fla_core-*.whl 2>/dev/null || ls .whl/*.whl)
  echo; echo "installing: $WHEELS"
  if $PY -m pip install -q --no-index --no-deps --target /tmp/site $WHEELS; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    run "fla baseline" 75 $PY benchmarks/lightning_kernels.py --fla --lengths 16384,65536,4096,1024
  else
    echo "!! fla wheels did not install: skipping the fla baseline"
  fi
else
  echo; echo "no .whl/*.whl: skipping the fla baseline"
fi
echo; echo "################ device check done in $(( $(date +%s) - START ))s"
