#!/usr/bin/env bash
# One command for the tests: set up the environment with the test extras, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "server,report,engines,test"
. .venv/bin/activate
python -m pytest Testing --durations=25 "$@"
