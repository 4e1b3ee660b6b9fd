# Sourced by the other scripts: `. scripts/setup.sh EXTRAS` makes (or reuses) a virtualenv in .venv
# unless one is active, and installs sigmatune with those extras. Any torch >= 2.4 works; when none
# is installed it takes 2.13.0, a CPU build these machines keep on disk (no 5 GB CUDA download).
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
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$1]"
