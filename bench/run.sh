#!/usr/bin/env bash
# The main job for now: set up .venv, then run the perturbation and drift benchmarks (writes bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tests/venv.sh
.venv/bin/python bench/bench_perturb.py "$@"
.venv/bin/python bench/bench_drift.py
