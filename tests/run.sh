#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (tests/setup_env.sh), then runs them.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k models -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/setup_env.sh
exec "$PYTHON" -m pytest -q "$@"
