#!/usr/bin/env bash
# Install gpu-orchestrator from this checkout. Usage: bash scripts/install.sh [test|http|ray]
# (the extra of that name; test includes http and ray).
# Where no torch is installed, take the CPU build first (an unpinned torch would pull gigabytes of CUDA
# packages); where torch is already there (e.g. a GPU image), keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${1:-}" in
  "") extra="" ;;
  test|http|ray) extra="[$1]" ;;
  *) echo "usage: bash scripts/install.sh [test|http|ray]" >&2; exit 2 ;;
esac
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".${extra}"
