"""Predicted share of copy bandwidth of the fused kernels on H100 / H200, from their SASS instruction counts.

A roofline with two ceilings per kernel pass over n elements:
  memory time       = bytes(mode, dtype) * n / HBM bandwidth,
  instruction time  = (hot-path SASS instructions per element) * n / (SMs * 4 schedulers * 32 lanes * clock),
and the pass takes the larger. A step is several passes; its predicted share of copy bandwidth is
(sum of memory times) / (sum of pass times). Bytes per element come from the mode's traffic (``MODE_BYTES``); the
instruction counts from ``bench/codegen.py`` (compiled ahead of time for sm_90, no GPU needed). This is an upper
bound: it assumes one instruction issued per scheduler per clock and peak HBM bandwidth.

    python bench/codegen_predict.py            # markdown table on stdout
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


def main() -> None:
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
