#!/usr/bin/env bash
# Create .venv (if missing) and install r1c with its test extras, CPU-only.
# torch is pinned to the CPU build first, so nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==${R1C_TORCH_VERSION:-2.13.0}"
fi
# The last check loads the installed pytest11 entry points: an editable install made before a module moved
# (e.g. the r1c_latency plugin) points at a path that no longer exists, and pytest would not start.
if ! python -c "import r1c, pytest, transformers, triton, tensorrt_rtx_bindings, fastapi, uvicorn, prometheus_client, openai" 2>/dev/null \
    || ! python -c "import importlib.metadata as m; [e.load() for e in m.entry_points(group='pytest11') if e.name == 'r1c_latency']" 2>/dev/null \
    || [ "${R1C_REINSTALL:-0}" = 1 ]; then
  python -m pip install -q -e ".[test,kernels,tensorrt-rtx,serve]"
fi
