#!/usr/bin/env bash
# The GPU benchmark in one call of the device tool, after benchmarks/gpu_wheels.sh:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=570)
# bf16 and fp32 on the CIFAR-10 preset at batch 128, then bf16 with performance.compile=true;
# JSON and Markdown land in $OUT (copy them to benchmarks/results/).
# A dry run of this script on a CPU: PY=.venv/bin/python BENCH_ARGS="--device cpu --batch 2 --rounds 1" OUT=/tmp/x
# `bash benchmarks/gpu.sh paper` instead scores the authors' CIFAR-10 weights (README, "Evaluate the paper's own
# weights") at reduced counts, when a copy of google/ddpm-ema-cifar10-32 (WEIGHTS) and the CIFAR-10 pickles
# (CIFAR_ROOT/cifar-10-batches-py) are on the machine: metrics.json lands in $OUT/paper.
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
paper() {  # the paper's protocol (ancestral over all 1000 steps, the scheduler's variance) at reduced counts
  local weights=${WEIGHTS:-ddpm-ema-cifar10-32} cifar=${CIFAR_ROOT:-data} ckpt=/tmp/ddpm-ema-cifar10.ckpt
  if [ ! -d "$weights" ] || [ ! -d "$cifar/cifar-10-batches-py" ]; then
    echo "paper protocol skipped: no weights folder $weights or no $cifar/cifar-10-batches-py" | tee "$out/paper.txt"
    return
  fi
  rm -f "$ckpt"
  timeout 120 "$PY" -m ddpmlab.hub import "$weights" --out "$ckpt" || return
  # 1,000 samples (the paper: 50k; FID is biased upwards at this count), the full bound on 50 test images and
  # the K=10 estimate on all 10k
  timeout 480 "$PY" evaluate.py ckpt="$ckpt" data_root="$cifar" metrics=[fid,is,nll,nll_estimate] \
    num_samples=1000 batch_size=500 nll.num_images=50 nll_estimate.num_images=null hydra.run.dir="$out/paper" \
    2>&1 | grep -v "it/s]"
}
if [ "${1:-}" = paper ]; then
  paper
else
  bench 160 h200-bf16 bf16
  bench 110 h200-fp32 32
  bench 230 h200-bf16-compile bf16 performance.compile=true
fi
ls -l "$out"
