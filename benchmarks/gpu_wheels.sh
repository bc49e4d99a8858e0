#!/usr/bin/env bash
# gpu_wheels.sh: fetch, on this machine, the wheels gpu_check.sh needs on a device machine that cannot reach pip:
# bitsandbytes (the 4-bit sections; the device image has none), PEFT and accelerate, each at the version this
# machine's tests run with (.venv, `make setup`; the image's may be older). They go to .whl/ (ignored by git): carry
# .whl with the run, and gpu_check.sh installs them into a temporary folder first. Pure-Python wheels except
# bitsandbytes', which holds its CUDA 11.8-13.2 libraries (~43 MB, under the 64 MiB a device call may carry).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]      the device's Python, default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
PY="${PYTHON:-.venv/bin/python}"
mapfile -t WHEELS < <("$PY" -c "import importlib.metadata as m
for p in ('bitsandbytes', 'peft', 'accelerate'): print(f'{p}=={m.version(p)}')")
mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
