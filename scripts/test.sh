#!/usr/bin/env bash
# The test command: lint (ruff), type-check (mypy on the package), then the pytest suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k router`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
. .venv/bin/activate
ruff check .
mypy -p r1c
python -m pytest -q "$@"
