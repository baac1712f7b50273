#!/usr/bin/env bash
# The latest lane: groma-core and every plugin against the newest releases their pyproject.toml files allow, without
# the lock (constraints.txt), in a venv of its own (.venv-latest). Only torch stays pinned to the local CPU build
# (an unpinned torch pulls several GB of CUDA) and torchvision stays out (see ENVIRONMENT notes). It shows what a
# registry release will break before the lock is refreshed to it.
#
#   bash scripts/test-latest.sh                                  newest releases, the suite but its heavy tests
#   bash scripts/test-latest.sh --all                            ... the whole suite, heavy tests included
#   bash scripts/test-latest.sh -- -k golden                     arguments after -- go to pytest
#   bash scripts/test-latest.sh --venv .venv-older --hold transformers==5.24.0
#                                                                the same with packages held (e.g. at a lower bound)
#   bash scripts/test-latest.sh --deadline 1796000000            tests that would start after that time (seconds
#                                                                since the epoch) are skipped, and the summary says how
#                                                                many (CI gives the lane what its time budget has left)
#
# Tests marked heavy (pyproject.toml: 15 s or more each, and what they exercise of third-party packages lighter tests
# exercise too) are left to the locked lane by default, which keeps CI's two lanes inside its time; --all runs them.
# The venv is reused and upgraded eagerly to the newest allowed releases; delete it for a clean install. The last
# line printed is the summary: passed/FAILED, the time taken, and every package whose version differs from the lock.
# Exit status: pytest's (0 = passed), 3 when the install failed or pulled torchvision.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=constraints.txt
venv=.venv-latest
holds=("torch==2.13.0" "torchvision<0")  # torchvision: no release is < 0, so nothing may pull it in
select=(-m "not heavy")
while [ $# -gt 0 ]; do
  case "$1" in
    --all) select=(); shift ;;
    --venv) venv=$2; shift 2 ;;
    --hold) holds+=("$2"); shift 2 ;;
    --deadline) export GROMA_TEST_DEADLINE=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--all] [--venv DIR] [--hold NAME==VERSION]... [--deadline EPOCH_S] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
  esac
done
lane="latest lane"
[ ${#holds[@]} -gt 2 ] && lane="$lane (holding ${holds[*]:2})"
[ ${#select[@]} -gt 0 ] && lane="$lane (heavy tests left to the locked lane)"
unset PIP_CONSTRAINT PIP_REQUIREMENT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
pins=$(mktemp)
out=$(mktemp)
trap 'rm -f "$pins" "$out"' EXIT
printf '%s\n' "${holds[@]}" >"$pins"

install() {
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv" || return 1
  . "$venv/bin/activate"
  python -m pip install --quiet -c "$pins" --upgrade pip setuptools wheel || return 1
  python -m pip install --quiet -c "$pins" torch==2.13.0 || return 1  # first, alone: the local CPU build
  local targets=(-e ".[test,demo]")
  for plugin in plugins/*/; do targets+=(-e "${plugin%/}[test]"); done
  python -m pip install --quiet --no-build-isolation --upgrade --upgrade-strategy eager -c "$pins" "${targets[@]}"
}
started=$SECONDS
if ! install; then
  echo "$lane: FAILED to install (pip's error above; a registry problem or an unresolvable release)"
  exit 3
fi
if python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "$lane: FAILED: torchvision got installed in $venv; it must never enter an environment" >&2
  exit 3
fi
install_s=$((SECONDS - started))

started=$SECONDS
python -m pytest -q -n auto --dist loadfile -p no:cacheprovider -rfE ${select[@]+"${select[@]}"} "$@" | tee "$out"
status=${PIPESTATUS[0]}
test_s=$((SECONDS - started))

# every package whose version differs from the lock: "name locked -> got" ("absent" when one side lacks it)
differs=$(python - "$LOCK" <<'EOF'
import re, sys
from importlib.metadata import distributions

def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()

locked = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
    if m:
        locked[key(m[1])] = (m[1], m[2].split("+")[0])
got = {key(d.metadata["Name"]): (d.metadata["Name"], d.version.split("+")[0]) for d in distributions()}
rows = []
for k in sorted(locked.keys() | got.keys()):
    if k.startswith("groma-"):
        continue
    name, old = locked.get(k, (None, "absent"))
    name2, new = got.get(k, (name, "absent"))
    if old != new:
        rows.append(f"{name or name2} {old} -> {new}")
print(", ".join(rows) or "nothing")
EOF
)
verdict=$([ "$status" -eq 0 ] && echo passed || echo "FAILED (exit $status)")
left_out=$(grep -m1 -o '^deadline: [0-9]* tests not run' "$out" | sed 's/^deadline: /, out of time: /')
echo "$lane: $verdict; install ${install_s}s, tests ${test_s}s${left_out}; versions differing from $LOCK: $differs"
exit "$status"
