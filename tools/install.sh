#!/usr/bin/env bash
# Create .venv (if missing) and install egp-deploy with the given extras: "cpu" (default), "test"
# (= cpu + test), "gpu", "gpu,test", ... The test extra brings no onnxruntime of its own, so the
# runtime comes from exactly one of cpu / gpu (they are the same module; never install both).
# torch==2.13.0 goes in FIRST: a bare torch requirement would otherwise pull GBs of CUDA wheels.
# With "test" the zoo extra comes too (torchvision:NAME / timm:NAME tests): torchvision 0.28.0 is
# the release built against torch 2.13.0, and a constraint keeps pip from replacing torch for it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu}"
case ",${extras}," in
  *,cpu,*|*,gpu,*) ;;
  *) extras="cpu,${extras}" ;;  # "test" alone means the CPU runtime plus the test tools
esac
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
case ",${extras}," in
  *,test,*)
    .venv/bin/python -m pip install -q -c "$constraints" torchvision==0.28.0 "timm>=1.0"
    extras="${extras},zoo" ;;
esac
.venv/bin/python -m pip install -q -c "$constraints" -e ".[${extras}]"
