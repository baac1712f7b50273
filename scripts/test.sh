#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the whole test suite: the command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
# one pytest-xdist worker a core (each with one torch thread: conftest.py); a test file stays on one worker, so its
# module fixtures are built once; `-n 0` (or `-p no:xdist`) after the command runs it in one process
python -m pytest -q -n auto --dist loadfile "$@"
