#!/usr/bin/env bash
# Audit the locked dependencies for known vulnerabilities with pip-audit (PyPI advisory data).
#
# Usage: scripts/audit.sh [LOCKFILE]
#   LOCKFILE   pinned requirements to audit; default: requirements.lock if present, otherwise the
#              exact versions installed in $VENV (pip freeze, the project itself excluded).
# Environment:
#   VENV=.venv          virtual environment holding pip-audit (installed on first use)
#   AUDIT_SERVICE=pypi  advisory source: pypi (PyPI JSON API) or osv (api.osv.dev)
#   AUDIT_STRICT=0      1: fail (exit 2) when the advisory data cannot be reached, instead of
#                       skipping the audit with a warning (CI often has only a package mirror)
# Exit status: 0 no known vulnerability (or audit skipped), 1 vulnerabilities found, 2 error.
#
# Known vulnerabilities that do not apply are listed in IGNORED below, one id per line with the
# reason; everything else fails the audit.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
SERVICE=${AUDIT_SERVICE:-pypi}
STRICT=${AUDIT_STRICT:-0}

# id  reason (keep sorted; remove an entry as soon as the fixed version is locked)
IGNORED=(
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

lock=${1:-}
if [[ -z "$lock" && -f requirements.lock ]]; then
    lock=requirements.lock
fi
if [[ -z "$lock" ]]; then
    lock="$work/requirements.txt"
    if ! "$VENV/bin/pip" freeze --exclude-editable --disable-pip-version-check >"$lock"; then
        echo "audit: cannot list the packages of $VENV (run 'make install' first)" >&2
        exit 2
    fi
fi

if [[ ! -x "$VENV/bin/pip-audit" ]]; then
    echo "audit: installing pip-audit into $VENV"
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check pip-audit; then
        msg="audit: pip-audit could not be installed (no package index?)"
        if [[ "$STRICT" == 1 ]]; then echo "$msg" >&2; exit 2; fi
        echo "$msg; SKIPPED, not failed. Set AUDIT_STRICT=1 to make this an error." >&2
        exit 0
    fi
fi

ignore_args=()
for entry in "${IGNORED[@]}"; do
    ignore_args+=(--ignore-vuln "${entry%% *}")
done

echo "audit: $(grep -cvE '^\s*(#|$)' "$lock") pinned packages from $lock, advisories from $SERVICE"
"$VENV/bin/pip-audit" --requirement "$lock" --no-deps --disable-pip --progress-spinner off \
    --vulnerability-service "$SERVICE" --format json --output "$work/report.json" \
    "${ignore_args[@]}" 2>"$work/stderr"
status=$?

# pip-audit exits 1 both for "vulnerabilities found" and for "could not ask the service"; the
# report tells them apart. A package index mirror without advisory data answers "not found on
# PyPI" for every package, which must not pass for a clean audit.
"$VENV/bin/python" - "$work/report.json" "$status" "$STRICT" "$work/stderr" <<'PY'
import json
import sys
from pathlib import Path

report, status, strict, stderr = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]


def unavailable(reason: str) -> None:
    print(f"audit: vulnerability data unavailable: {reason}", file=sys.stderr)
    if strict:
        sys.exit(2)
    print("audit: SKIPPED, not failed (set AUDIT_STRICT=1 to make this an error)", file=sys.stderr)
    sys.exit(0)


if not report.is_file():
    lines = [ln for ln in Path(stderr).read_text(errors="replace").splitlines() if ln.strip()]
    unavailable(lines[-1] if lines else f"pip-audit exited with {status}")
deps = json.loads(report.read_text()).get("dependencies", [])
skipped = [d for d in deps if "skip_reason" in d]
audited = [d for d in deps if "skip_reason" not in d]
if deps and not audited:
    unavailable(f"none of {len(deps)} packages could be looked up ({skipped[0]['skip_reason']})")
found = [(d["name"], d["version"], v) for d in audited for v in d.get("vulns", [])]
for name, version, vuln in found:
    fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
    print(f"VULNERABLE {name} {version}: {vuln['id']} (fixed in {fixes})")
for d in skipped:
    print(f"audit: not audited: {d['name']}: {d['skip_reason']}", file=sys.stderr)
print(f"audit: {len(audited)} packages audited, {len(skipped)} skipped, {len(found)} vulnerable")
sys.exit(1 if found else 0)
PY
