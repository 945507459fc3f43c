#!/usr/bin/env bash
# The README's test command: install from nothing (into .venv) and run the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh test
.venv/bin/python -m pytest "$@"
