# Sourced by tests/run.sh and pretrain/demo.sh: a virtualenv in .venv (override with VENV=...) holding torch
# and torchvision as one matching pair from PyPI (timm and open_clip import torchvision, which fails next to
# a mismatched torch) and this package with its test extra, at the verified versions of tests/constraints.txt.
# Leaves "$PYTHON" pointing at its interpreter.
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.11.0 torchvision==0.26.0
# The pins hold for the Python they were verified on (numpy 2.4 needs 3.11, for one); elsewhere pip picks.
python_version=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if grep -qx "# python $python_version" tests/constraints.txt; then
    constraints=(-c tests/constraints.txt)
else
    echo "tests/constraints.txt was verified on another Python than $python_version: installing without it" >&2
    constraints=()
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" ${constraints[@]+"${constraints[@]}"}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHON="$venv/bin/python"
