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
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
exec "$python" -m hub.client.rollback "$config" "$@" --signal
