#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs them: a virtualenv in .venv (override
# with VENV=...), torch and torchvision as one matching pair from PyPI (timm and open_clip import
# torchvision, which fails next to a mismatched torch), the package with its test extra, then pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k models -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.11.0 torchvision==0.26.0
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/python" -m pytest -q "$@"
