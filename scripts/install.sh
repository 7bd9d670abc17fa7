#!/usr/bin/env bash
# Install chaintune. On a machine without CUDA, put the CPU build torch==2.13.0 in place *before*
# anything else asks for torch (an unpinned torch pulls gigabytes of CUDA packages). An existing
# torch (CUDA or not) is left alone. Usage: scripts/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.1"
  else
    "$PY" -m pip install -q "torch==2.13.0" \
      || "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -q -e ".${extras}"
