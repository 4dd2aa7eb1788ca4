"""Weight drift of 1,000 perturb/restore cycles: plain in-place arithmetic vs exact restore (fp32 masters).

Plain mode is what the reference implementation does: theta + eps*z - 2*eps*z + eps*z, rounding after each pass.
Usage:  python bench/bench_drift.py [--cycles 1000] [--eps 1e-3] [--numel 1000000]
Prints a table and replaces the `drift` section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mezo_kernels as mk  # noqa: E402
from results import replace_section  # noqa: E402


def drift(dtype: torch.dtype, exact: bool, cycles: int, eps: float, numel: int, backend: str) -> dict:
    theta = (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    x = theta.clone()
    ps = mk.ParamSet([x], backend=backend, exact_restore=exact)
    for c in range(cycles):
        ps.perturb_(c, eps).perturb_(c, -eps).restore_()
    d = (x.double() - theta.double()).abs()
    return dict(dtype=str(dtype).split(".")[1], mode="exact (fp32 master)" if exact else "plain in-place",
                changed=f"{100 * (d > 0).double().mean().item():.2f}%", max_abs=f"{d.max().item():.3e}",
                mean_abs=f"{d.mean().item():.3e}", rel=f"{(d.norm() / theta.double().norm()).item():.3e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--numel", type=int, default=1_000_000)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    a = ap.parse_args(argv)
    rows = [drift(dt, ex, a.cycles, a.eps, a.numel, a.backend)
            for dt in (torch.float32, torch.bfloat16, torch.float16) for ex in (False, True)]
    backend = mk.ParamSet([torch.zeros(1)], backend=a.backend).backend
    head = (f"Command: `python bench/bench_drift.py --cycles {a.cycles} --eps {a.eps} --numel {a.numel}`  \n"
            f"Backend {backend}, CPU, torch {torch.__version__}, date {datetime.date.today()}. Weights ~ N(0, 0.02^2); "
            f"each cycle is +eps, -eps (i.e. -2eps in place), restore; drift = |theta_after - theta_before|.\n\n"
            "| dtype | mode | elements changed | max abs drift | mean abs drift | ‖drift‖/‖θ‖ |\n|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['dtype']} | {r['mode']} | {r['changed']} | {r['max_abs']} | {r['mean_abs']} | {r['rel']} |\n"
                   for r in rows)
    print(head + body)
    replace_section(a.results, "drift", head + body)


if __name__ == "__main__":
    main()
