#!/usr/bin/env bash
# The main job: sets up .venv (scripts/setup.sh), then fine-tunes the default model (SmolLM2-135M-
# Instruct) on the default task (BIG-bench qa_wikidata) on CPU, printing scores before and after.
# Arguments go to `sigmatune train`, e.g. `bash scripts/train.sh --steps 300 --rank full`.
set -euo pipefail
. "$(dirname "$0")/setup.sh" cli
sigmatune train --setup-seconds "$SECONDS" "$@"  # the job's time table counts the set-up too
