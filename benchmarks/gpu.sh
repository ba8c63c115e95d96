#!/usr/bin/env bash
# The GPU benchmark in one call of the device tool, after benchmarks/gpu_wheels.sh:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=570)
# bf16 and fp32 on the CIFAR-10 preset at batch 128, then bf16 with performance.compile=true;
# JSON and Markdown land in $OUT (copy them to benchmarks/results/).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$out/gpu.txt"
bench() { timeout "$1" python3 -m ddpmlab.bench --preset cifar10 --batch 128 "${@:2}" 2>&1 | grep -v "it/s]"; }
bench 170 --precision bf16 --out "$out/h200-bf16.json"
bench 120 --precision 32 --out "$out/h200-fp32.json"
bench 250 --precision bf16 --out "$out/h200-bf16-compile.json" -- performance.compile=true
