#!/usr/bin/env bash
# Roll back to the single-instance behaviour: set pool.enabled: false for every provider in
# CONFIG and tell the running supervisor to reload it (a rolling restart; no request fails).
# Undo with: scripts/rollback.sh CONFIG --undo
# A gray release's rollback: scripts/rollback.sh CONFIG --route NAME [--to PROVIDER] sends every request
# for the route to its baseline (the config's heaviest provider) on the running hub, at once.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--undo | --route NAME [--to PROVIDER]]" >&2
  exit 2
fi
config="$(realpath "$1")"  # before the cd below: a path relative to where the script was called from
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# the Python that has the hub's packages: $PYTHON if set, else the repo's .venv, the active virtualenv,
# or python3/python on PATH, the first that imports hub.client.rollback
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in "$root/.venv/bin/python" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" python3 python; do
    if [ -n "$candidate" ] && "$candidate" -c "import hub.client.rollback" >/dev/null 2>&1; then
      python="$candidate"
      break
    fi
  done
  if [ -z "$python" ]; then
    echo "$0: no Python here can import the hub's packages (tried $root/.venv/bin/python, \$VIRTUAL_ENV, python3 and python on PATH);" \
      "run it as PYTHON=/path/to/venv/bin/python $0 ..." >&2
    exit 2
  fi
fi
exec "$python" -m hub.client.rollback "$config" "$@" --signal
