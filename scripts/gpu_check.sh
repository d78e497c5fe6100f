#!/usr/bin/env bash
# The GPU check of r1c's GPU path (see scripts/gpu_check.py): native kernel tests, AOT kernels launched through the
# CUDA driver as the plugins launch them, timings at DeepSeek-R1 shapes against the H200's peaks, the tiny model on
# the GPU against the CPU bundle. One table; log and table in $OUT when set; exit 1 on any failure.
# Run from anywhere; needs python with torch and triton (no r1c install: the script puts the checkout on sys.path).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
