#!/bin/sh
# Check GPU placement, readings and readiness on this GPU host; PASS/FAIL per item, exit 1 on any FAIL.
# Usage: scripts/gpu_check.sh [--no-bench]    (PYTHON=... picks the interpreter; default .venv/bin/python)
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" scripts/gpu_check.py "$@"
