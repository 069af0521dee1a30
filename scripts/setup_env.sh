#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install AutoNNUNetLib into it.
# Usage: bash scripts/setup_env.sh [extras]   e.g. "server,report,test"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [ -n "$EXTRAS" ]; then
    python -m pip install --quiet -e ".[${EXTRAS}]"
else
    python -m pip install --quiet -e .
fi
