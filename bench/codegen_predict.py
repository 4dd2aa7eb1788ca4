"""Predicted share of copy bandwidth of the fused kernels on H100 / H200, from their SASS instruction counts.

A roofline with two ceilings per kernel pass over n elements:
  memory time       = bytes(mode, dtype) * n / HBM bandwidth,
  instruction time  = (hot-path SASS instructions per element) * n / (SMs * 4 schedulers * 32 lanes * clock),
and the pass takes the larger. A step is several passes; its predicted share of copy bandwidth is
(sum of memory times) / (sum of pass times). Bytes per element come from the mode's traffic (``MODE_BYTES``); the
instruction counts from ``bench/codegen.py`` (compiled ahead of time for sm_90, no GPU needed). This is an upper
bound: it assumes one instruction issued per scheduler per clock and peak HBM bandwidth.

    python bench/codegen_predict.py            # markdown table on stdout
    python bench/codegen_predict.py --lowrank [--results bench/RESULTS.md]   # the low-rank update pass (issue 21)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import codegen  # noqa: E402

# name: (SMs, boost clock GHz, HBM TB/s), from the vendors' data sheets (SXM parts)
GPUS = {"H100": (132, 1.98, 3.35), "H200": (132, 1.98, 4.8)}
_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def mode_bytes(mode: int, dtype: str) -> int:
    """HBM bytes per element of one pass: AXPBY/AXPBY_SR read+write d; MASTER_UPDATE read+write the fp32 master
    and write d; MASTER_VIEW read the master, write d; FILL write d; OUT read the source, write d."""
    s = _SIZE[dtype]
    return {0: 2 * s, 1: 8 + s, 2: 4 + s, 3: s, 4: 2 * s, 5: 2 * s}[mode]


# one MeZO step's passes (mode, repeat): +eps, -eps, fused restore+update
STEPS = {
    "bf16, fp32 masters (in place)": [(2, 2), (1, 1)],
    "bf16, no masters (in place, drifts)": [(0, 3)],
    "bf16, virtual (OUT x2 + AXPBY_SR)": [(4, 2), (5, 1)],
    "fp32 (in place)": [(0, 3)],
}


def share(passes, dtype: str, insts: dict[int, float], gpu: str) -> float:
    sms, ghz, tbs = GPUS[gpu]
    ips = sms * 4 * 32 * ghz * 1e9
    mem = sum(k * mode_bytes(m, dtype) / (tbs * 1e12) for m, k in passes)
    tot = sum(k * max(mode_bytes(m, dtype) / (tbs * 1e12), insts[m] / ips) for m, k in passes)
    return mem / tot


def _insts(kind: str, dtype: str, dist: str) -> dict[int, float] | None:
    rep = codegen.triton_report(90) if kind == "triton" else codegen.cuda_report(90)
    out = {}
    for m in range(6):
        key = f"mode{m}/{dtype}/aligned" if kind == "triton" else f"mode{m}/{dtype}/{dist}"
        if key not in rep or rep[key].get("per_elem") is None:
            return None
        out[m] = rep[key]["per_elem"]
    return out


# ------------------------------------------------------------------------------------------------ low-rank update
# The fused low-rank update pass (csrc/cuda/lowrank.cu, issue 21), per 2-d tensor (m, n) at rank r: the update kernel
# over the 64 x 64 tiles (every thread of a partial tile computes) takes the largest of four ceilings -- HBM bytes
# (W read + written, plus the float64 factor scratch written once and read once), issue (hot-path instructions per
# element), the float64 pipe (64 lanes per SM per clock on H100/H200: DMUL/DFMA per element) and the 64-bit
# conversion pipe (16 per SM per clock) -- and the pre-pass adds its hot path per Philox counter (r (m + n) / 4 of
# them) at the issue rate. The share is the copy time of W's bytes over that total. Launch latency is not modelled
# (two launches per tensor).
FP64_LANES, CVT64_LANES, TILE = 64, 16, 64
LOWRANK_CASES = (("fp32", "nearest"), ("bf16", "stochastic"))


def lowrank_share(shapes, r: int, dtype: str, rounding: str, rep: dict, gpu: str) -> tuple[float, str]:
    """(predicted share of copy bandwidth of one update pass over ``shapes``, the ceiling that binds most often)."""
    sms, ghz, tbs = GPUS[gpu]
    clk, bw = sms * ghz * 1e9, tbs * 1e12
    s = rep[f"lowrank/{dtype}/{rounding}/r{r}"]
    pre = next(v["path_insts"] for k, v in rep.items() if "factors_kernel" in k)
    copy = total = 0.0
    binds: dict[str, int] = {}
    for m, n in shapes:
        mp, np_ = -(-m // TILE) * TILE, -(-n // TILE) * TILE
        w_bytes = 2 * _SIZE[dtype] * m * n
        ceilings = {"memory": (w_bytes + 2 * 8 * r * (mp + np_)) / bw,
                    "issue": s["per_elem"] * mp * np_ / (clk * 128),
                    "fp64": s["fp64_insts"] / s["elements"] * mp * np_ / (clk * FP64_LANES),
                    "cvt64": s["cvt64_insts"] / s["elements"] * mp * np_ / (clk * CVT64_LANES)}
        top = max(ceilings, key=ceilings.get)
        binds[top] = binds.get(top, 0) + 1
        copy += w_bytes / bw
        total += ceilings[top] + pre * r * (m + n) / 4 / (clk * 128)
    return copy / total, max(binds, key=binds.get)


def lowrank_table() -> str:
    """Markdown: the predicted H100/H200 share of one update pass per model, dtype and rank (sm_90 SASS counts)."""
    import lowrank_pass
    from mezo_kernels.rng.lowrank import uses_lowrank
    rep = codegen.cuda_report(90)
    out = ["| model | dtype (rounding) | r | SASS insts / element | fp64 insts / element | H100 | H200 | bound by (most "
           "tensors, H100) |", "|---|---|---|---|---|---|---|---|"]
    for model in lowrank_pass.MODELS:
        shapes = [s for s in lowrank_pass.model_shapes(model) if len(s) == 2]
        for dtype, rounding in LOWRANK_CASES:
            for r in (1, 4, 16):
                sel = [s for s in shapes if uses_lowrank(s, r)]
                e = rep[f"lowrank/{dtype}/{rounding}/r{r}"]
                h100, bound = lowrank_share(sel, r, dtype, rounding, rep, "H100")
                h200, _ = lowrank_share(sel, r, dtype, rounding, rep, "H200")
                out.append(f"| {model} | {dtype} ({rounding}) | {r} | {e['per_elem']} | "
                           f"{e['fp64_insts'] / e['elements']:g} | {100 * h100:.0f}% | {100 * h200:.0f}% | {bound} |")
    return "\n".join(out) + "\n"


def main() -> None:
    if "--lowrank" in sys.argv[1:]:
        table = lowrank_table()
        print(table)
        if "--results" in sys.argv[1:]:
            from results import replace_section
            path = sys.argv[sys.argv.index("--results") + 1]
            head = (f"Command: `python bench/codegen_predict.py --lowrank --results bench/RESULTS.md` (nvcc "
                    f"{codegen.nvcc_version()}, sm_90 SASS, no GPU). One update pass over every 2-d weight of the "
                    "model; the model in `bench/codegen_predict.py` (`lowrank_share`). Predictions, not "
                    "measurements.\n\n")
            replace_section(path, "codegen-lowrank", head + table)
            print(f"wrote block codegen-lowrank of {path}")
        return
    print("| step | kernel | H100 | H200 |\n|---|---|---|---|")
    for step, passes in STEPS.items():
        dtype = "fp32" if step.startswith("fp32") else "bf16"
        for kind, dist in (("triton", "gaussian"), ("cuda", "gaussian"), ("cuda", "rademacher")):
            insts = _insts(kind, dtype, dist)
            if insts is None:
                continue
            cells = " | ".join(f"{100 * share(passes, dtype, insts, g):.0f}%" for g in GPUS)
            print(f"| {step} | {kind} {dist} | {cells} |")


if __name__ == "__main__":
    main()
