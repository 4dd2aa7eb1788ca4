"""The on-paper scale-out model of docs/scale.md: MeZO and backprop FSDP step time and traffic for 7B/70B/405B
Llama shapes on 8, 64 and 1,024 H100s, by layout. Every input is marked published, assumed or measured (the
measured per-layer bytes come from bench_scale.py). ``python bench/bench_scale.py --paper`` prints the table."""
from __future__ import annotations

# ------------------------------------------------------------------------------------------- on paper (docs/scale.md)
# Published figures (docs/scale.md gives the sources) and assumptions, in one place.
PAPER = dict(
    flops=989e12,          # published: H100 SXM bf16 dense tensor-core peak, FLOP/s
    mfu=0.40,              # assumed: share of that peak a forward reaches
    nvlink_busbw=360e9,    # assumed: NCCL bus bandwidth inside an 8-GPU NVLink 4 node (900 GB/s bidir. published)
    ib_busbw=40e9,         # assumed: NCCL bus bandwidth per GPU across nodes (one 400 Gb/s NDR port, 50 GB/s)
    hbm=3.35e12,           # published: H100 SXM HBM3 bandwidth, B/s
    gpu_mem=80e9,          # published: H100 SXM memory, bytes
    tokens=4096,           # assumed: tokens per GPU per forward (2 sequences x 2048), the "modest batch"
    tp=8,                  # TP inside a node of 8 GPUs
)
# Llama shapes: (hidden, layers, heads, kv heads, head dim, intermediate, vocab, tied)
PAPER_SHAPES = {
    "7B": (4096, 32, 32, 32, 128, 11008, 32000, False),        # Llama-2-7B
    "70B": (8192, 80, 64, 8, 128, 28672, 128256, False),       # Llama-3-70B
    "405B": (16384, 126, 128, 8, 128, 53248, 128256, False),   # Llama-3.1-405B
}


def paper_params(shape) -> tuple[int, int]:
    """(parameters, parameters of one decoder layer) of a PAPER_SHAPES entry."""
    h, layers, heads, kv, hd, inter, vocab, tied = shape
    layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
    return layers * layer + vocab * h * (1 if tied else 2) + h, layer


def paper_row(name: str, gpus: int, layout: str, c: dict = PAPER) -> dict | None:
    """Per-GPU figures of one MeZO step and one backprop-FSDP-style step for (model, GPUs, layout); None where
    the layout cannot hold the model. Layouts: dp, fsdp, tp-dp (TP inside a node, DP across), fsdp-tp."""
    shape = PAPER_SHAPES[name]
    h, layers = shape[0], shape[1]
    p, _ = paper_params(shape)
    w = 2 * p                                          # bf16 weights, bytes
    t = c["tp"] if layout in ("tp-dp", "fsdp-tp") else 1
    if layout in ("tp-dp", "fsdp-tp") and gpus < t:
        return None
    d = gpus // t                                      # data-parallel (or FSDP) degree
    fsdp = layout in ("fsdp", "fsdp-tp")
    held = w / t / (d if fsdp else 1)                  # weights per GPU after reshard
    tok = t * c["tokens"]                              # a TP group runs its t GPUs' tokens together
    act = tok * (h + 2 * shape[5] / t) * 2 + tok * shape[6] * 4 / t   # one layer's (FFN sharded) + fp32 logits
    mem = held + act + (w / t / layers if fsdp else 0)                    # + one gathered layer in flight
    if mem > c["gpu_mem"]:
        return None
    compute = 2 * 2 * p * c["tokens"] / (c["flops"] * c["mfu"])            # 2 forwards, 2 FLOP per parameter
    bw_dp = c["ib_busbw"] if (gpus > 8 if t == 1 else d > 1) else c["nvlink_busbw"]   # DP axis leaves the node?
    ag = 2 * w / t * (d - 1) / d if fsdp else 0.0                         # MeZO: all-gather per forward, 2 forwards
    tp = 2 * 2 * layers * (t * c["tokens"] * h * 2) * 2 * (t - 1) / t if t > 1 else 0.0   # ring bytes per GPU
    t_ag = ag / bw_dp
    t_tp = tp / c["nvlink_busbw"]
    update = 3 * p / t / (d if fsdp else 1) * 10 / c["hbm"]                  # 3 local passes, ~10 B per parameter
    step = max(compute, t_ag) + t_tp + update      # all-gathers prefetched under compute; TP on the critical path
    # backprop at the same sizes: forward + backward (3x a forward's FLOPs), FSDP: all-gather fwd + bwd and a
    # bf16 reduce-scatter of the gradients; DP: an all-reduce of the gradients; TP: 2 all-reduces per layer each way
    bp_ag = 3 * w / t * (d - 1) / d if fsdp else 2 * w / t * (d - 1) / d
    bp_tp = tp
    return dict(model=name, gpus=gpus, layout=layout, params=p, held=held, mem=mem, compute=compute,
                ag=ag, t_ag=t_ag, tp=tp, t_tp=t_tp, scalar=16, update=update, step=step,
                bp_comm=bp_ag + bp_tp, bp_inter=bp_ag, bound="compute" if compute >= t_ag else "all-gather")


def paper_table(c: dict = PAPER) -> str:
    """The docs/scale.md table: every (model, GPUs, layout), MeZO's step beside backprop's traffic."""
    head = ("| model (params) | GPUs | layout | MeZO bytes held/GPU GB (+ fp32 masters) | compute s | "
            "all-gather GB/GPU (s) | TP all-reduce GB/GPU (s) | loss exchange B | MeZO step s | bound | "
            "backprop traffic GB/GPU (of it across the DP axis) | MeZO / backprop traffic |")
    out = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for name in PAPER_SHAPES:
        for g in (8, 64, 1024):
            for lay in ("dp", "fsdp", "tp-dp", "fsdp-tp"):
                r = paper_row(name, g, lay, c)
                label = f"{name} ({paper_params(PAPER_SHAPES[name])[0] / 1e9:.1f} B)"
                if r is None:
                    out.append(f"| {label} | {g} | {lay} | does not fit 80 GB | | | | | | | | |")
                    continue
                mezo = r["ag"] + r["tp"] + r["scalar"]
                bound = "TP all-reduces" if r["t_tp"] > 0.25 * r["compute"] and r["bound"] == "compute" else r["bound"]
                out.append(
                    f"| {label} | {g} | {lay} | {r['mem'] / 1e9:.1f} (+{2 * r['held'] / 1e9:.1f}) | "
                    f"{r['compute']:.2f} | {r['ag'] / 1e9:.1f} ({r['t_ag']:.2f}) | {r['tp'] / 1e9:.1f} "
                    f"({r['t_tp']:.2f}) | {r['scalar'] if g > 1 else 0} | {r['step']:.2f} | {bound} | "
                    f"{r['bp_comm'] / 1e9:.1f} ({r['bp_inter'] / 1e9:.1f}) | {mezo / r['bp_comm']:.2f} |")
    return "\n".join(out)
