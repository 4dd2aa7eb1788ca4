#!/usr/bin/env bash
# Every benchmark, one after the other (each rewrites its section of bench/RESULTS.md, its CSV in bench/out/ and
# its plots): fused perturbation vs the reference loop, weight drift, forward-engine reuse, and the step harness
# (inference vs MeZO vs reference loop vs backprop, time and peak memory). About 35 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tests/venv.sh
dev=$(.venv/bin/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
.venv/bin/python bench/bench_perturb.py --device "$dev"
.venv/bin/python bench/bench_drift.py
.venv/bin/python bench/bench_forward.py --device "$dev"
.venv/bin/python bench/bench_step.py --device "$dev"
