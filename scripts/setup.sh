#!/usr/bin/env bash
# Create .venv and install groma-core and every plugin under plugins/ (editable), torch pinned to the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT="$PWD/constraints.txt"
python -m pip install --quiet --upgrade pip setuptools wheel
python -m pip install --quiet torch==2.13.0              # first, alone: the local CPU build
python -m pip install --quiet --no-build-isolation -e ".[test]"
for plugin in plugins/*/; do
  python -m pip install --quiet --no-build-isolation -e "${plugin%/}[test]"
done
if python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "error: torchvision got installed; it does not work with this torch build (see ENVIRONMENT notes)" >&2
  exit 1
fi
