#!/usr/bin/env bash
# The test command: makes a virtualenv (.venv) unless one is active, installs sigmatune with its
# test extras, checks style (ruff check, ruff format --check), then runs pytest. Extra arguments
# go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
# Any torch >= 2.4 works; 2.13.0 is a CPU build that these machines keep on disk (no 5 GB download).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
ruff check .
ruff format --check .
python -m pytest "$@"
