#!/usr/bin/env bash
# Create .venv with everything edgetune, its export stage and its tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a CUDA build of several GB.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[export,test,federated]"
"$VENV/bin/edgetune" --version
