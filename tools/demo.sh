#!/usr/bin/env bash
# The README's first command: install (CPU, into .venv) and run the main job end to end on the
# bundled digits data: prune -> export -> surgery -> verify -> bench -> check (-> build with TensorRT).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh cpu
.venv/bin/python tools/main_job.py "$@"
