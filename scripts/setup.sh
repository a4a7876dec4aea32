#!/usr/bin/env bash
# Create .venv and install meshlm with every CPU dependency at exact versions.
# Usage: bash scripts/setup.sh   (idempotent; a second run only checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.13.0 is a CPU build; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet \
  torch==2.13.0 \
  numpy==2.4.6 \
  mpich==5.0.2 mpi4py==4.1.2 \
  safetensors==0.8.0 tokenizers==0.23.3 transformers==5.24.0 huggingface_hub==2.4.0 gguf==0.19.0 \
  accelerate==1.15.0 \
  jinja2==3.1.6 tqdm==4.70.1 matplotlib==3.11.2 \
  fastapi==0.165.0 uvicorn==0.54.0 prometheus-client==0.26.0 httpx==0.28.1 openai==3.57.0 \
  llguidance==1.9.1 compressed-tensors==0.20.0 loguru==0.7.3 \
  pytest==9.2.0 pytest-timeout==2.4.0 setuptools==84.2.1
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
echo "meshlm installed in .venv ($(.venv/bin/python -c 'import torch, mpi4py; print("torch", torch.__version__, "mpi4py", mpi4py.__version__)'))"
