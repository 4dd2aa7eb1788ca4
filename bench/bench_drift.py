"""Weight drift of 1,000 perturb/restore cycles: plain in-place arithmetic vs exact restore (fp32 masters) vs
virtual perturbation; and what rounding keeps of many tiny updates without masters (stochastic vs to-nearest).

Plain mode is what the reference implementation does: theta + eps*z - 2*eps*z + eps*z, rounding after each pass.
Virtual mode (``perturb="virtual"``) shows a module theta ± eps*z in transient buffers and writes nothing; each of
its cycles here also issues the stochastically rounded update with lr = 0 (the one write a step makes; MeZO itself
skips it at lr = 0), so the row checks that the passes and the update path together leave every bit in place.
The update table applies ``--sr-steps`` updates theta <- theta - lr*z(seed_k) (g = 1) to bf16/fp16 weights without
masters, with each rounding, against the same updates on an fp32 copy: "kept" = <Δ_low, Δ_fp32> / ‖Δ_fp32‖²
(1 = the intended total update, 0 = lost), error = ‖Δ_low - Δ_fp32‖ / ‖Δ_fp32‖.
Usage:  python bench/bench_drift.py [--cycles 1000] [--eps 1e-3] [--numel 1000000] [--sr-steps 1000]
Prints the tables and replaces the `drift` section of bench/RESULTS.md (``--results`` elsewhere for a smoke run).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mezo_kernels as mk  # noqa: E402
from mezo_kernels.virtual import VirtualPerturbation  # noqa: E402
from results import replace_section  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _theta(numel: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)


def _row(dtype: torch.dtype, mode: str, theta: torch.Tensor, x: torch.Tensor) -> dict:
    d = (x.double() - theta.double()).abs()
    return dict(dtype=str(dtype).split(".")[1], mode=mode,
                changed=f"{100 * (d > 0).double().mean().item():.2f}%", max_abs=f"{d.max().item():.3e}",
                mean_abs=f"{d.mean().item():.3e}", rel=f"{(d.norm() / theta.double().norm()).item():.3e}")


def drift(dtype: torch.dtype, exact: bool, cycles: int, eps: float, numel: int, backend: str) -> dict:
    theta = _theta(numel, dtype)
    x = theta.clone()
    ps = mk.ParamSet([x], backend=backend, exact_restore=exact)
    for c in range(cycles):
        ps.perturb_(c, eps).perturb_(c, -eps).restore_()
    return _row(dtype, "exact (fp32 master)" if exact else "plain in-place", theta, x)


class _Dot(nn.Module):
    """loss = <weight, v> in fp32: a module that reads its weight in its own forward (what the hooks need)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.v = torch.randn(weight.numel(), generator=torch.Generator().manual_seed(1))

    def forward(self) -> torch.Tensor:
        return self.weight.float() @ self.v


def virtual_drift(dtype: torch.dtype, cycles: int, eps: float, numel: int, backend: str) -> dict:
    """``cycles`` of: loss at +eps (virtual), loss at -eps (virtual), stochastically rounded update with lr = 0."""
    theta = _theta(numel, dtype)
    mod = _Dot(theta.clone())
    ps = mk.ParamSet([mod.weight], backend=backend, exact_restore=False)
    vp = VirtualPerturbation(mod, [ps])
    seen = 0
    with torch.no_grad():
        for c in range(cycles):
            with vp.perturbed(c, eps):
                lp = float(mod())
            with vp.perturbed(c, -eps):
                lm = float(mod())
            seen += lp != lm
            ps.update_(c, 0.0, (lp - lm) / (2 * eps), rounding="stochastic")
    if seen < cycles // 2:
        raise RuntimeError(f"the virtual passes moved the loss in only {seen} of {cycles} cycles: not perturbed?")
    return _row(dtype, "virtual (no masters), SR update lr=0", theta, mod.weight.detach())


def update_drift(dtype: torch.dtype, steps: int, lr: float, numel: int, backend: str) -> list[dict]:
    """One row per rounding: ``steps`` updates -lr*z(k) on ``dtype`` weights without masters vs an fp32 copy."""
    theta = _theta(numel, dtype)
    ref = theta.float().clone()
    ps_ref = mk.ParamSet([ref], backend=backend)
    for k in range(steps):
        ps_ref.update_(k, lr, 1.0)
    want = ref.double() - theta.double()
    rows = []
    for rounding in ("nearest", "stochastic"):
        x = theta.clone()
        ps = mk.ParamSet([x], backend=backend, exact_restore=False)
        for k in range(steps):
            ps.update_(k, lr, 1.0, rounding=rounding)
        got = x.double() - theta.double()
        rows.append(dict(dtype=str(dtype).split(".")[1], rounding=rounding,
                         changed=f"{100 * (got != 0).double().mean().item():.2f}%",
                         kept=f"{(got @ want / (want @ want)).item():.4f}",
                         err=f"{((got - want).norm() / want.norm()).item():.3e}"))
    return rows


def tables(a) -> str:
    rows = [drift(dt, ex, a.cycles, a.eps, a.numel, a.backend) for dt in DTYPES for ex in (False, True)]
    rows += [virtual_drift(dt, a.cycles, a.eps, a.numel, a.backend) for dt in DTYPES]
    rows.sort(key=lambda r: [str(d).split(".")[1] for d in DTYPES].index(r["dtype"]))   # grouped by dtype
    upd = [r for dt in DTYPES[1:] for r in update_drift(dt, a.sr_steps, a.sr_lr, a.numel, a.backend)]
    backend = mk.ParamSet([torch.zeros(1)], backend=a.backend).backend
    head = (f"Command: `python bench/bench_drift.py --cycles {a.cycles} --eps {a.eps} --numel {a.numel} "
            f"--sr-steps {a.sr_steps} --sr-lr {a.sr_lr}`  \n"
            f"Backend {backend}, CPU, torch {torch.__version__}, date {datetime.date.today()}. Weights ~ N(0, 0.02^2); "
            f"each cycle is +eps, -eps (i.e. -2eps in place), restore; drift = |theta_after - theta_before|. "
            "Virtual: the ± passes are read-only (transient buffers), then the stochastically rounded update with "
            "lr = 0 is applied.\n\n"
            "| dtype | mode | elements changed | max abs drift | mean abs drift | ‖drift‖/‖θ‖ |\n|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['dtype']} | {r['mode']} | {r['changed']} | {r['max_abs']} | {r['mean_abs']} | {r['rel']} |\n"
                   for r in rows)
    upd_head = (f"\nUpdates without masters: {a.sr_steps} steps theta <- theta - lr*z(seed_k), lr = {a.sr_lr}, "
                "against the same steps in fp32 (kept: share of the intended total update that arrived, 1 = all; "
                "error: ‖Δ − Δ_fp32‖/‖Δ_fp32‖).\n\n"
                "| dtype | rounding | elements changed | kept | error |\n|---|---|---|---|---|\n")
    upd_body = "".join(f"| {r['dtype']} | {r['rounding']} | {r['changed']} | {r['kept']} | {r['err']} |\n"
                       for r in upd)
    return head + body + upd_head + upd_body


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--numel", type=int, default=1_000_000)
    ap.add_argument("--sr-steps", type=int, default=1000, help="updates in the rounding table")
    ap.add_argument("--sr-lr", type=float, default=1e-5, help="lr of those updates (g = 1)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    a = ap.parse_args(argv)
    for k in ("cycles", "numel", "sr_steps"):
        if getattr(a, k) < 1:
            raise SystemExit(f"bench_drift.py: error: --{k.replace('_', '-')} must be >= 1")
    text = tables(a)
    print(text)
    replace_section(a.results, "drift", text)


if __name__ == "__main__":
    main()
