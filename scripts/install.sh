#!/usr/bin/env bash
# Create .venv (if missing) and install r1c into it, CPU-only.
#   bash scripts/install.sh          the main job: r1c and what export, optimize, build, run and bench need
#   bash scripts/install.sh --serve  also the serve extra (r1c serve: FastAPI, uvicorn, prometheus-client, tokenizers, jinja2)
#   bash scripts/install.sh --test   also the test, kernel, TensorRT-for-RTX, dist and serve extras (scripts/test.sh calls this)
# torch is pinned to the CPU build first, so nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=""
NEEDS="import r1c, onnxruntime, onnxscript"
if [ "${1:-}" = "--test" ]; then
  EXTRAS="[test,kernels,tensorrt-rtx,dist,serve]"
  NEEDS="$NEEDS, pytest, transformers, triton, tensorrt_rtx_bindings, onnxruntime_extensions, fastapi, uvicorn"
  NEEDS="$NEEDS, prometheus_client, openai"
elif [ "${1:-}" = "--serve" ]; then
  EXTRAS="[serve]"
  NEEDS="$NEEDS, fastapi, uvicorn, prometheus_client, tokenizers, jinja2"
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/install.sh [--serve | --test]" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==${R1C_TORCH_VERSION:-2.13.0}"
fi
# With the test extras, also load the installed pytest11 entry points: an editable install made before a module
# moved (e.g. the r1c_latency plugin) points at a path that no longer exists, and pytest would not start.
plugin_ok() {
  [ -z "$EXTRAS" ] || python -c "import importlib.metadata as m; [e.load() for e in m.entry_points(group='pytest11') if e.name == 'r1c_latency']" 2>/dev/null
}
if ! python -c "$NEEDS" 2>/dev/null || ! plugin_ok || [ "${R1C_REINSTALL:-0}" = 1 ]; then
  python -m pip install -q -e ".$EXTRAS"
fi
# ONNX Runtime's C/C++ headers, so that `r1c build` can compile r1c's CPU kernels (the default where it builds;
# without them builds use ONNX Runtime's MoE and say so). Best effort: Debian/Ubuntu with g++ only.
if ! python -c "from r1c.plugins.cpu_moe.library import find_headers; raise SystemExit(find_headers() is None)" \
    && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null && command -v g++ >/dev/null; then
  bash scripts/fetch_ort_headers.sh >/dev/null 2>&1 || echo "install: could not fetch ONNX Runtime's headers" \
    "(scripts/fetch_ort_headers.sh); r1c build will use ONNX Runtime's MoE kernel" >&2
fi
