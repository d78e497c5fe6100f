#!/usr/bin/env bash
# Sharded bundles on NCCL, on a machine with N >= 2 NVIDIA GPUs and full TensorRT (`import tensorrt`):
#   bash scripts/dist_gpu_check.sh [N] [PRESET]          # default: all visible GPUs, the tiny preset
# 1. NCCL all-reduce latency at the 8 x H200 plan's message sizes (the plan's allreduce_latency_s);
# 2. export PRESET, build the one-rank onnxruntime bundle (the CPU reference) and tensorrt bundles for
#    TP=N, EP=N (when the experts divide) and TP=2 x EP=N/2; run each with torchrun over NCCL and compare
#    logits (1e-3 relative) and greedy tokens with the reference; time decode steps.
# Prints PASS/FAIL/INFO lines; exits non-zero when a check fails. Not run on the CPU-only development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
PRESET=${2:-tiny}
if [ "${N}" -lt 2 ]; then
  echo "dist_gpu_check: needs at least 2 GPUs (found ${N})" >&2
  exit 2
fi
[ -x .venv/bin/python ] || bash scripts/install.sh
. .venv/bin/activate
python -c "import tensorrt" || { echo "dist_gpu_check: full TensorRT is needed (pip install tensorrt-cu12)" >&2; exit 2; }
WORK=${R1C_DIST_WORK:-$(mktemp -d /tmp/r1c-dist-gpu-XXXX)}
echo "INFO work dir ${WORK}; ${N} GPUs; preset ${PRESET}"
torchrun --standalone --nproc-per-node "${N}" scripts/dist_gpu_check.py --nccl-latency
r1c export --preset "${PRESET}" --seed 0 -o "${WORK}/export" --no-progress
r1c build "${WORK}/export" -o "${WORK}/reference"
status=0
for layout in "${N} 1" "1 ${N}" "2 $((N / 2))"; do
  set -- ${layout}
  [ "$(( $1 * $2 ))" -eq "${N}" ] || continue
  bundle="${WORK}/trt.tp$1.ep$2"
  if ! r1c build "${WORK}/export" -o "${bundle}" --target tensorrt --tensor-parallel "$1" --expert-parallel "$2"; then
    echo "FAIL build TP$1 x EP$2"; status=1; continue
  fi
  torchrun --standalone --nproc-per-node "${N}" scripts/dist_gpu_check.py "${bundle}" \
    --reference "${WORK}/reference" || status=1
done
exit ${status}
