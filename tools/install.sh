#!/usr/bin/env bash
# Create .venv (if missing) and install egp-deploy with the given extra ("cpu" or "test").
# torch==2.13.0 goes in FIRST: a bare torch requirement would otherwise pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-cpu}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[${extra}]"
