# Sourced by the other scripts: `. scripts/setup.sh EXTRAS` makes (or reuses) a virtualenv in .venv
# unless one is active, and installs sigmatune with those extras at the tested versions: every package
# pinned by scripts/constraints.txt (pip's -c; pyproject.toml's ranges stay open). Any torch >= 2.4
# works; when none is installed it takes 2.13.0, a CPU build these machines keep on disk (no 5 GB CUDA
# download); a torch already installed is kept, with what it requires itself (scripts/constraints.py).
# SIGMATUNE_CONSTRAINTS= (empty) installs the newest versions pyproject.toml allows instead
# (scripts/test-newest.sh does); SIGMATUNE_TORCH names the torch to install where there is none.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "setting up .venv: torch, transformers and sigmatune (the first time only, ~45 s on 2 cores)" >&2
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -c "import torch" 2>/dev/null || python -m pip install -q "${SIGMATUNE_TORCH:-torch==2.13.0}"
sigmatune_constraints="${SIGMATUNE_CONSTRAINTS-scripts/constraints.txt}"
if [ -z "$sigmatune_constraints" ]; then
  python -m pip install -q -e ".[$1]"
else
  sigmatune_effective="$(mktemp)"
  python scripts/constraints.py effective "$sigmatune_constraints" >"$sigmatune_effective"
  if ! python -m pip install -q -c "$sigmatune_effective" -e ".[$1]"; then
    rm -f "$sigmatune_effective"
    echo "the tested versions ($sigmatune_constraints) did not install here; SIGMATUNE_CONSTRAINTS= before" \
      "the command installs the newest versions pyproject.toml allows instead" >&2
    exit 1
  fi
  rm -f "$sigmatune_effective"
fi
