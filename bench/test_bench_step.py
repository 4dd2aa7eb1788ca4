"""pytest-benchmark entry points for the step benchmark (run: pytest bench/ --benchmark-only).

One step of each method (inference forward, MeZO in place with masters, virtual, batched ± and 4 directions for
LoRA, the MeZO reference loop, backprop+AdamW with and without checkpointing) on the tiny random models, in this process: a timing harness for quick comparisons. Peak memory
per method needs a fresh process each (bench_step.py does that). Not part of `tests/`: benchmarks report numbers,
they never fail on a slow machine.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_worker as w  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = [m for m in w.METHODS if m not in w.LOW_PRECISION_ONLY]   # in fp32 the same as mezo-inplace-master


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
def test_step(benchmark, model, mode, method):
    if mode == "full" and method in w.LORA_ONLY:
        pytest.skip(f"{method} batches LoRA directions: lora mode only")
    c = w.check_config(dict(model=model, batch=4, seq=64, mode=mode, dtype="fp32", method=method, device=DEVICE))
    s = w.Setup(c)
    step = w.make_step(method, s, c)
    benchmark.extra_info.update(tokens=c["batch"] * c["seq"], n_trainable=sum(p.numel() for p in s.params))
    benchmark(lambda: (step(), _sync()))
