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
  # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: where pip's own index would give the CUDA
  # build (Linux x86-64 from PyPI), take the CPU one from PyTorch's index instead.
  .venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/python -m pip install -q -e ".[onnx,test]"
