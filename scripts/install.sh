#!/usr/bin/env bash
# Create .venv (if missing) and install wsi-espnet into it, CPU-sized: PyTorch 2.13.0 CPU first, so
# that the project's `torch<2.14` range is already met and pip never pulls a multi-GB CUDA build.
# GPU users: install a CUDA build of torch into .venv first (README, "GPU"); it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[onnx,test]"
