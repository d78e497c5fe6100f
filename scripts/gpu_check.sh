#!/usr/bin/env bash
# GPU check of the r1c Triton kernels: native kernel tests, then the timing table (see scripts/gpu_check.py).
# Run from anywhere; needs python with torch and triton (no r1c install: the script puts the checkout on sys.path).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
