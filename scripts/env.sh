#!/usr/bin/env bash
# Create or reuse the project's virtual environment (sourced by test.sh and demo.sh).
# torch==2.13.0 (CPU) goes in first so no unpinned torch pulls gigabytes of CUDA packages.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MRNGAN_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.mrngan-installed"
if [ ! -f "$STAMP" ] || [ "$REPO/pyproject.toml" -nt "$STAMP" ]; then
  echo "setup: installing torch==2.13.0, then monai-mrngan and its dependencies" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$REPO[test]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
MRNGAN_PY="$VENV/bin/python"
