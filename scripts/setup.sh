#!/usr/bin/env bash
# Create .venv (if missing) and install deepeq with its dev, bench, train and plot extras, pinned by
# constraints.txt (torch 2.13.0 CPU). Idempotent: a second run only re-checks the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,bench,train,plot]"
