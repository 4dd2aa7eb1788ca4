"""The fused low-rank update pass (``mezo-lowrank``, issue 21) against a copy of the same bytes, for bench_perturb.

One update pass = ``perturb.lowrank.lowrank_update_`` on every 2-d weight of a model that takes a rank-r direction
(``rng.lowrank.uses_lowrank``): W <- round(fma(U Vᵀ/√r, -lr*g, (1 - lr*wd) W)), U and V regenerated from the seed,
bf16/fp16 rounded stochastically. It reads and writes each weight once, so its floor is a copy of the same bytes:
the weights are views of one buffer and the reference is one ``dst.copy_(src)`` of that buffer (one parallel
region: per-tensor copies would each pay torch's OpenMP barrier, which a loaded machine turns into a scheduler slice
per tensor), timed in the same run, interleaved with the passes rep by rep. Tensors that keep the dense Gaussian
(norms, biases, tensors with r*(m + n) >= m*n) are left out of both: they are not this pass.

Shapes: every parameter of the model built on the meta device from its config (tied weights once), weights random
``0.02 * N(0, 1)`` in the dtype.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from mezo_kernels.perturb.lowrank import lowrank_update_
from mezo_kernels.rng.lowrank import uses_lowrank

MODELS = ("smollm2-135m", "llama-1b-rand", "opt-1.3b-rand")
LR, G, WD = 1e-6, 0.5, 0.1


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Shapes of every parameter of ``name`` (``models.load_config`` for SmolLM2, ``bench/step_models.py``'s
    configs for the 1B architectures), tied weights once."""
    from transformers import AutoModelForCausalLM
    if name == "smollm2-135m":
        from mezo_kernels.models import load_config
        cfg = load_config(name)
    else:
        from step_models import _config
        cfg = _config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [tuple(p.shape) for p in model.parameters()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, dtype: torch.dtype, ranks: tuple[int, ...], reps: int, device: torch.device,
            backend: str = "auto") -> list[dict]:
    """The copy row and one row per rank: median/min/max seconds over ``reps`` reps (each rep: the copy, then one
    pass per rank), bytes moved (read + write of the tensors), and per rank the share of copy bandwidth (copy
    median / pass median) with its spread (min..max of the per-rep ratio). The tensors: the 2-d ones that take a
    rank-r direction for every r of ``ranks`` (for the three models: every 2-d weight)."""
    shapes = [s for s in model_shapes(name) if all(uses_lowrank(s, r) for r in ranks)]
    g = torch.Generator().manual_seed(0)
    total = sum(math.prod(s) for s in shapes)
    src = torch.empty(total, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ws, at = [], 0
    for s in shapes:      # the weights are views of one buffer, so the copy of the same bytes is one copy_
        w = src[at:at + math.prod(s)].view(s)
        w.copy_(torch.randn(s, generator=g) * 0.02)
        ws.append(w)
        at += w.numel()
    rounding = "nearest" if dtype == torch.float32 else "stochastic"

    def copy():
        dst.copy_(src)

    def update(r, seed):
        base = 0
        for w in ws:
            lowrank_update_(w, seed, seed, base, r, LR, G, WD, rounding, backend)
            base += w.numel()

    copy()
    for r in ranks:                           # warm-up: pages touched, extension and kernels loaded
        update(r, 1)
    _sync(device)
    times = {"copy": []} | {r: [] for r in ranks}
    for rep in range(reps):
        for key in times:
            _sync(device)
            t0 = time.perf_counter()
            copy() if key == "copy" else update(key, 2 + rep)
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    common = dict(model=name, dtype=str(dtype).split(".")[1], tensors=len(ws), numel=sum(w.numel() for w in ws),
                  bytes=2 * sum(w.numel() * w.element_size() for w in ws))
    tc = times.pop("copy")
    rows = [dict(common, method="copy (same bytes)", ms=1e3 * statistics.median(tc), ms_min=1e3 * min(tc),
                 ms_max=1e3 * max(tc), share="", share_min="", share_max="")]
    for r, tp in times.items():
        ratio = [c / p for c, p in zip(tc, tp)]
        rows.append(dict(common, method=f"mezo-lowrank r={r}", ms=1e3 * statistics.median(tp), ms_min=1e3 * min(tp),
                         ms_max=1e3 * max(tp), share=statistics.median(tc) / statistics.median(tp),
                         share_min=min(ratio), share_max=max(ratio)))
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of ``measure``'s rows (GB/s from the median; share = copy time / pass time)."""
    out = ["| model | dtype | method | 2-d tensors | elements | median ms | spread ms | GB/s | share of copy BW "
           "| per-rep share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        share = (f"**{100 * x['share']:.0f} %**" if x["share"] != "" else "")
        spread = f"{100 * x['share_min']:.0f}..{100 * x['share_max']:.0f} %" if x["share"] != "" else ""
        out.append(f"| {x['model']} | {x['dtype']} | {x['method']} | {x['tensors']} | {x['numel']} | {x['ms']:.1f} | "
                   f"{x['ms_min']:.1f}..{x['ms_max']:.1f} | {x['bytes'] / x['ms'] / 1e6:.1f} | {share} | {spread} |")
    return "\n".join(out) + "\n"
