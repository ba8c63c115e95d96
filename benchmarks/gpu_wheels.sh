#!/usr/bin/env bash
# Fetch, on this machine, the wheels the lent GPU machine lacks for the benchmark, into .whl/ (git-ignored).
# Its image has torch, lightning and huggingface-hub; it has no hydra-core, omegaconf, antlr4 or diffusers.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl hydra-core==1.3.2 omegaconf==2.3.0 diffusers==0.42.1 importlib-metadata
# antlr4's runtime is published as a source distribution only: build its (pure Python) wheel here
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
