#!/usr/bin/env bash
# Refresh constraints.txt, the lock: resolve everything scripts/setup.sh installs in a throwaway venv made from nothing
# (torch==2.13.0 first and alone, then groma-core with its [test,demo] extras and every plugins/* with [test]) and
# write its full `pip freeze`, less the groma packages themselves, under a header carrying the fingerprint of the dependency
# declarations it was resolved from.
#   bash scripts/lock.sh                              newest releases that resolve (torch stays 2.13.0)
#   bash scripts/lock.sh transformers==5.23.0 ...     the same with some packages held at a version
#   bash scripts/lock.sh --fingerprint                print the fingerprint of the pyproject.toml files (setup.sh)
# After a refresh run `bash scripts/test.sh` before committing the new constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=constraints.txt
TORCH=torch==2.13.0

# sha256 of what every pyproject.toml declares about dependencies (names, requirements, extras, build requirements),
# normalised so that comments, order and spacing do not count; a new or removed plugin folder changes it too
fingerprint() {
  "$PYTHON" - <<'EOF'
import glob, hashlib, json, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, or the copy pip vendors
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        try:
            from pip._vendor import tomli as tomllib
        except ModuleNotFoundError:
            sys.exit("error: reading pyproject.toml needs Python >= 3.11, or tomli or pip installed")
norm = lambda reqs: sorted("".join(r.split()).lower() for r in reqs)
declared = {}
for path in ["pyproject.toml", *sorted(glob.glob("plugins/*/pyproject.toml"))]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    project = data.get("project", {})
    declared[path] = {
        "name": project.get("name"),
        "dependencies": norm(project.get("dependencies", [])),
        "optional": {k: norm(v) for k, v in sorted(project.get("optional-dependencies", {}).items())},
        "build": norm(data.get("build-system", {}).get("requires", [])),
    }
print(hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest())
EOF
}

if [ "${1:-}" = "--fingerprint" ]; then
  fingerprint
  exit 0
fi
for hold in "$@"; do
  [[ "$hold" == *==* ]] || { echo "error: lock.sh takes exact pins (name==version), got '$hold'" >&2; exit 2; }
done

deps_sha=$(fingerprint)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the packages are built from a copy, so that the checkout gets no build/ or egg-info litter
mkdir "$tmp/src"
tar -c --exclude=__pycache__ --exclude="*.egg-info" --exclude=build pyproject.toml README.md groma_core recipes plugins \
  | tar -x -C "$tmp/src"
unset PIP_CONSTRAINT PIP_REQUIREMENT PIP_TARGET PIP_PREFIX
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
printf '%s\n' "$TORCH" "$@" >"$tmp/holds.txt"
echo "lock: resolving in a fresh venv under $tmp (a minute or more)"
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
log="$tmp/pip.log"
pip_quiet() {  # pip, its output shown only when it fails
  if ! "$py" -m pip "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: pip $* failed (above)" >&2
    exit 1
  fi
}
PIP_CONSTRAINT="$tmp/holds.txt" pip_quiet install --upgrade pip setuptools wheel
PIP_CONSTRAINT="$tmp/holds.txt" pip_quiet install "$TORCH"  # first, alone: the local CPU build
targets=("$tmp/src[test,demo]")
for plugin in plugins/*/; do
  targets+=("$tmp/src/${plugin%/}[test]")
done
# one resolution for everything, built here (no isolation: setuptools is in the venv); not editable, so that the
# groma packages' own dependencies are what pip resolves
PIP_CONSTRAINT="$tmp/holds.txt" pip_quiet install --no-build-isolation "${targets[@]}"
if "$py" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "error: the resolution pulled torchvision (it does not work with this torch build); not writing $LOCK" >&2
  exit 1
fi
"$py" -m pip freeze --all | grep -viE '^groma([-_]|$)' >"$tmp/freeze.txt"
count=$(wc -l <"$tmp/freeze.txt")
{
  echo "# The lock: every package scripts/setup.sh (and so CI) installs, at the exact version it was tested with."
  echo "# Every install goes through this file (PIP_CONSTRAINT): torch stays the local CPU build, torchvision never enters."
  echo "# Written by scripts/lock.sh from a fresh venv (torch first, then groma-core[test,demo] and plugins/*[test]); do not edit."
  echo "# Refresh after changing the dependencies of any pyproject.toml (setup.sh refuses a stale lock), then run the tests:"
  echo "#   bash scripts/lock.sh [NAME==VERSION ...]    (names with a version are held; the next line keeps this lock's)"
  echo "# made by: bash scripts/lock.sh${*:+ $*}"
  echo "# resolved: $(date -u +%Y-%m-%d), Python $("$py" -c 'import platform; print(platform.python_version())'), $count packages"
  echo "# dependencies-sha256: $deps_sha"
  cat "$tmp/freeze.txt"
} >"$LOCK.new"
mv "$LOCK.new" "$LOCK"
echo "lock: wrote $LOCK ($count packages)"
