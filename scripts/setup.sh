#!/usr/bin/env bash
# Create .venv and install groma-core and every plugin under plugins/ (editable) at the exact versions of the lock,
# constraints.txt (written by scripts/lock.sh); torch is the local CPU build, installed first and alone.
# One line per step; pip's output is shown, in full, only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=constraints.txt

# the lock must have been resolved from the dependencies the pyproject.toml files declare now
locked=$(sed -n 's/^# dependencies-sha256: *//p' "$LOCK")
declared=$(PYTHON="$PYTHON" bash scripts/lock.sh --fingerprint)
if [ "$locked" != "$declared" ]; then
  refresh=$(sed -n 's/^# made by: *//p' "$LOCK")
  echo "error: $LOCK is out of date (dependencies in pyproject.toml or plugins/*/pyproject.toml changed since it was made); refresh it with: ${refresh:-bash scripts/lock.sh}" >&2
  exit 1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
step() {  # step "what" command...: one line, and the command's output only if it fails
  local what=$1
  shift
  echo "setup: $what"
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: setup failed at: $what (output above)" >&2
    exit 1
  fi
}

[ -x .venv/bin/python ] || step "creating .venv with $PYTHON" "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_CONSTRAINT="$PWD/$LOCK"
step "pip, setuptools, wheel" python -m pip install --upgrade pip setuptools wheel
step "torch 2.13.0 (CPU build), first and alone" python -m pip install torch==2.13.0
step "groma-core[test,demo], editable" python -m pip install --no-build-isolation -e ".[test,demo]"
plugins=()
for plugin in plugins/*/; do
  plugins+=(-e "${plugin%/}[test]")
done
step "$((${#plugins[@]} / 2)) plugins under plugins/ with [test], editable" \
  python -m pip install --no-build-isolation "${plugins[@]}"
if python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "error: torchvision got installed; it does not work with this torch build (see ENVIRONMENT notes)" >&2
  exit 1
fi
echo "setup: done (.venv: versions from $LOCK; activate with . .venv/bin/activate)"
