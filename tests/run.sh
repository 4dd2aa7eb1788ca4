#!/usr/bin/env bash
# The test command (README, .ci/run): build a fresh .venv, install torch + the project, run the whole suite.
# Triton kernels run through TRITON_INTERPRET=1 (set by tests/conftest.py) when there is no GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tests/venv.sh
exec .venv/bin/python -m pytest -q -ra tests "$@"
