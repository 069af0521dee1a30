#!/usr/bin/env bash
# One command for a newcomer: set up the environment, then run the demo
# (generated two-channel dataset -> fingerprint -> short training -> prediction -> Dice).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
autonnunet demo --workdir "${DEMO_WORKDIR:-demo_run}" "$@"
