"""pytest-benchmark entry points for the fused step vs the reference loop (run: pytest bench/ --benchmark-only).

Not part of `tests/`: benchmarks report numbers, they never fail on a slow machine.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mezo_kernels as mk  # noqa: E402
from bench_perturb import fused_step, reference_step  # noqa: E402
from tensor_sets import make, tensor_sets  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETS = ["smollm2-135m-lora-qv-r8", "llama7b-lora-qv-r8"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step(benchmark, name, dtype):
    ps = mk.ParamSet(make(tensor_sets(DEVICE)[name], dtype, DEVICE))
    benchmark.extra_info.update(backend=ps.backend, numel=ps.numel)
    benchmark(lambda: (fused_step(ps, 3), _sync()))


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_loop(benchmark, name, dtype):
    params = make(tensor_sets(DEVICE)[name], dtype, DEVICE)
    benchmark(lambda: (reference_step(params, 3), _sync()))
