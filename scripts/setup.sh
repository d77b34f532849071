#!/usr/bin/env bash
# Create .venv with gradwatch installed (and torch, only if the interpreter has none).
#   scripts/setup.sh          the package
#   scripts/setup.sh test     the package and its test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # gradwatch never installs torch itself (your training environment has its own build);
  # this virtual environment needs one to run the demo and the tests.
  echo "==> installing torch 2.13.0 (and numpy, which torch looks for) into .venv"
  .venv/bin/python -m pip install --quiet "torch==2.13.0" numpy
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
echo "==> installing gradwatch${extras} into .venv"
# pin the torch that is there: no dependency (accelerate, lightning) may upgrade or replace it
constraint="$(mktemp)"
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > "$constraint"
.venv/bin/python -m pip install --quiet --constraint "$constraint" --editable ".${extras}"
rm -f "$constraint"
