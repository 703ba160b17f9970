#!/usr/bin/env bash
# Install gpu-orchestrator from this checkout. Usage: bash scripts/install.sh [test|http]
# Where no torch is installed, take the CPU build first (an unpinned torch would pull gigabytes of CUDA
# packages); where torch is already there (e.g. a GPU image), keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi  # test includes the http extra
if [ "${1:-}" = "http" ]; then extra="[http]"; fi
"$PY" -m pip install -q -e ".${extra}"
