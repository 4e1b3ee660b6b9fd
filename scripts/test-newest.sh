#!/usr/bin/env bash
# The newest versions, on purpose: the test command (ruff check, ruff format --check, pytest) in a
# throwaway virtualenv that has sigmatune's [cli,plot,serve,test] at the newest versions pyproject.toml
# allows (no scripts/constraints.txt), then what differs from the tested versions. With --update, a
# passing run rewrites scripts/constraints.txt from that virtualenv. Other arguments go to pytest, e.g.
# `bash scripts/test-newest.sh -m "not slow"`. torch is the one setup.sh installs where there is none
# (2.13.0, CPU); SIGMATUNE_TORCH=torch tries the newest (on Linux a CUDA build, ~5.7 GB). The register
# checks (tests/core/spills.py) run here whatever the Triton: they pass before its version is pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
update=0
if [ "${1:-}" = --update ]; then
  update=1
  shift
fi
newest="$(mktemp -d "${TMPDIR:-/tmp}/sigmatune-newest.XXXXXX")"
trap 'rm -rf "$newest"' EXIT
python3 -m venv "$newest"
# shellcheck disable=SC1091
. "$newest/bin/activate"
export SIGMATUNE_CONSTRAINTS="" SIGMATUNE_CHECK_SPILLS=1
. scripts/setup.sh cli,plot,serve,test
status=0
{ ruff check . && ruff format --check . && python -m pytest "$@"; } || status=$?
echo "the newest versions against scripts/constraints.txt (pinned -> installed):"
python scripts/constraints.py diff scripts/constraints.txt
if [ "$status" -ne 0 ]; then
  echo "the suite failed with the newest versions (exit $status); scripts/constraints.txt is unchanged" >&2
elif [ "$update" -eq 1 ]; then
  python scripts/constraints.py freeze >scripts/constraints.txt
  echo "scripts/constraints.txt now pins these versions: review \`git diff scripts/constraints.txt\`, commit" >&2
fi
exit "$status"
