#!/usr/bin/env bash
# Every GPU check of minicirc in one run (issue 30), from the repository root of a fresh machine with a GPU:
#   bash scripts/gpu_check.sh [OUT]              # OUT defaults to ./gpu-check; the whole run within 8 minutes
#   bash scripts/gpu_check.sh --dry-run [OUT]    # the same plumbing on the CPU, tiny sizes, under 3 minutes (CI)
# Writes OUT/gpu-report.md (one line per check), OUT/results.json, OUT/gpu-check.log, OUT/demo-report.md.
# The work is done by scripts/gpu_check.py (its docstring lists the checks); this only picks the python:
# $PYTHON if set, else python3 (on the GPU machines, the one that holds torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python || true)}
if [ -z "$PY" ]; then
  echo "gpu_check: no python3 found; set PYTHON" >&2
  exit 2
fi
exec "$PY" scripts/gpu_check.py "$@"
