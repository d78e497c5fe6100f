#!/usr/bin/env bash
# The main job on the embedded default: the tiny preset, exported, built for ONNX Runtime, run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
out=${1:-out/quickstart}  # its own folder: the README's "Using it" block writes out/tiny itself
rm -rf "$out/tiny" "$out/tiny.bundle"
r1c export --preset tiny -o "$out/tiny"
r1c build "$out/tiny" -o "$out/tiny.bundle" --target onnxruntime
r1c run "$out/tiny.bundle" --input-ids "1 2 3" --input-ids "4 5 6 7 8" --max-new-tokens 8
