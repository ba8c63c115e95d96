#!/usr/bin/env bash
# The GPU benchmark in one call of the device tool, after benchmarks/gpu_wheels.sh:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=570)
# bf16 and fp32 on the CIFAR-10 preset at batch 128, then bf16 with performance.compile=true;
# JSON and Markdown land in $OUT (copy them to benchmarks/results/).
# A dry run of this script on a CPU: PY=.venv/bin/python BENCH_ARGS="--device cpu --batch 2 --rounds 1" OUT=/tmp/x
set -uo pipefail
PY=${PY:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv > "$out/gpu.txt" 2>&1
bench() {  # bench SECONDS NAME PRECISION [ddpmlab overrides...]; BENCH_ARGS (a dry run's) come last and win
  local seconds=$1 name=$2 precision=$3
  shift 3
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  timeout "$seconds" "$PY" -m ddpmlab.bench --preset cifar10 --batch 128 --precision "$precision" \
    --out "$out/$name.json" ${BENCH_ARGS:-} -- "$@" 2>&1 | grep -v "it/s]"
}
bench 160 h200-bf16 bf16
bench 110 h200-fp32 32
bench 230 h200-bf16-compile bf16 performance.compile=true
ls -l "$out"
