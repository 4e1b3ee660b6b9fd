#!/usr/bin/env bash
# The test command: sets up .venv at the tested versions (scripts/setup.sh), checks style (ruff check,
# ruff format --check), then runs pytest. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
. "$(dirname "$0")/setup.sh" cli,plot,serve,test
ruff check .
ruff format --check .
python -m pytest "$@"
