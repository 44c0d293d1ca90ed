#!/usr/bin/env bash
# Run the test suite against the NEWEST releases of the test oracles, not the pinned ones:
# a fresh temporary venv, minift's runtime and extras with every version pin dropped, then
# pytest. It reports what breaks and which versions it tried; it is not part of CI (a new
# release must not turn CI red). When it passes, moving the pins is a commit of its own
# (README: "Moving a pin").
#
#   scripts/test_latest.sh [pytest args...]     e.g. scripts/test_latest.sh -x tests/test_peft_lora.py
#
# Keep the venv for a look afterwards with KEEP_VENV=1.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d "${TMPDIR:-/tmp}/minift-latest.XXXXXX")
[ "${KEEP_VENV:-0}" = 1 ] || trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv" && . "$venv/bin/activate" || exit 1
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"   # torch is not an oracle: the CPU build CI uses

# The extras' requirements with their version specifiers removed ("peft==0.21.2" -> "peft").
mapfile -t latest < <(python - <<'PY'
import re, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
names = {re.split(r"[=<>!~;\[ ]", r, maxsplit=1)[0] for reqs in extras.values() for r in reqs}
print("\n".join(sorted(names)))
PY
)
echo "newest releases of: ${latest[*]}"
python -m pip install --quiet --upgrade -e . "${latest[@]}" || { echo "FAILED to install"; exit 1; }

# What moved: the pinned version next to the one installed now.
python - <<'PY'
import re, tomllib
from importlib.metadata import version, PackageNotFoundError
pins = {}
for reqs in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"].values():
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", r)
        if m:
            pins[m[1]] = m[2]
for name, pinned in sorted(pins.items()):
    try:
        now = version(name)
    except PackageNotFoundError:
        now = "(not installed)"
    print(f"  {name:14s} pinned {pinned:12s} latest {now}" + ("   <- moved" if now != pinned else ""))
PY

python -m pytest -q -rfE "$@" | tee "$venv/pytest.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 0 ]; then
    echo "test_latest: everything passes on the newest releases; the pins can move"
else
    echo "test_latest: pytest exited $rc on the newest releases; what broke:"
    grep -E "^(FAILED|ERROR) " "$venv/pytest.log" || true
fi
exit "$rc"
