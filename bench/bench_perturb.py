"""Per-step perturbation cost: fused kernels (3 passes) vs the reference MeZO loop (4 passes).

One MeZO step touches the weights with +eps, -2eps, +eps (restore) and -lr*g*z. The reference implementation does
each pass as ``torch.manual_seed`` then, per tensor, ``torch.normal`` + add: 4 unfused passes. Ours is 3 fused
passes: perturb(+eps), perturb(-eps), restore+update.

Each fused step runs once per direction distribution (gaussian, and the rademacher sign stream, which needs one
Philox call per 128 elements instead of per 4); the sign-vs-gaussian ratio of each backend is printed and recorded.

Usage:  python bench/bench_perturb.py [--device cpu|cuda] [--reps N] [--results bench/RESULTS.md] [--quick]
Writes bench/out/perturb_<device>.csv and replaces the matching section of RESULTS.md (``--quick``: two sets,
5 reps, bench/out/perturb_<device>_quick.csv only, RESULTS.md untouched).

``--method mezo-lowrank [--ranks 1,4,16] [--models ...]``: instead, the fused low-rank update pass (issue 21) on
every 2-d weight of SmolLM2-135M (fp32, bf16) and the 1B Llama / OPT-1.3B shapes (bf16) against a copy of the same
bytes timed in the same run (``bench/lowrank_pass.py``); writes bench/out/perturb_lowrank_<device>.csv and the
block ``perturb-lowrank-<device>`` of RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mezo_kernels as mk  # noqa: E402
from mezo_kernels.kernels import unsupported_reason  # noqa: E402
from mezo_kernels.rng import KernelMode  # noqa: E402
from results import replace_section  # noqa: E402
from tensor_sets import make, tensor_sets  # noqa: E402

EPS, LR, G = 1e-3, 1e-6, 0.5


def timer(device: torch.device):
    """Returns f(fn, reps) -> list of seconds per call (device events on CUDA, perf_counter on the CPU)."""
    def run(fn, reps):
        for _ in range(2):
            fn()
        out = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); fn(); b.record(); b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
        return out
    return run


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def device_label(device: str) -> str:
    """The device a benchmark ran on, as the RESULTS sections name it: GPU name, or CPU model and thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def reference_pass(params, seed: int, scale: float) -> None:
    """One pass of the reference MeZO loop: seed, then per tensor a fresh z and an out-of-place add."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data + scale * z


def reference_step(params, seed: int) -> None:
    """The reference MeZO loop's 4 passes back to back (+eps, -2eps, +eps, -lr*g), without the forwards."""
    for scale in (EPS, -2 * EPS, EPS, -LR * G):
        reference_pass(params, seed, scale)


def fused_step(ps: mk.ParamSet, seed: int) -> None:
    ps.perturb_(seed, EPS).perturb_(seed, -EPS).restore_update_(seed, LR, G)


def copy_bandwidth(device: torch.device, run, reps: int) -> float:
    """Bytes read + written per second by a large device copy (the ceiling the kernels are held to)."""
    n = 2**24 if device.type == "cpu" else 2**28
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return 2 * 4 * n / statistics.median(run(lambda: dst.copy_(src), reps))


def step_bytes(ps: mk.ParamSet) -> int:
    """Fewest bytes a fused step must move: each pass reads and writes each weight (masters where kept)."""
    total = 0
    for t, m in zip(ps.tensors, ps.masters()):
        b, n = t.element_size(), t.numel()
        # plain: 3 x (read + write); master: 2 x (read m, write d) + (read m, write m, write d)
        total += 3 * 2 * b * n if m is None else n * (2 * (4 + b) + (8 + b))
    return total


def lowrank_main(args, device: torch.device) -> None:
    """``--method mezo-lowrank``: the update pass against a copy of the same bytes (module docstring)."""
    import lowrank_pass
    ranks = tuple(int(r) for r in args.ranks.split(","))
    models = args.models.split(",") if args.models else list(lowrank_pass.MODELS)
    rows = []
    for name in models:
        for dtype in ((torch.float32, torch.bfloat16) if name == "smollm2-135m" else (torch.bfloat16,)):
            got = lowrank_pass.measure(name, dtype, ranks, args.reps, device, args.backends or "auto")
            print(lowrank_pass.table(got), flush=True)
            rows += got
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"perturb_lowrank_{device.type}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
    backend = mk.kernels.choose_lowrank(args.backends or "auto", device)
    head = (f"Command: `python bench/bench_perturb.py --device {device.type} --method mezo-lowrank --reps {args.reps}"
            f" --ranks {args.ranks}`  \n"
            f"Device: {device_label(device.type)}; backend `{backend}`; torch {torch.__version__}; "
            f"date {datetime.date.today()}; load average at the end {os.getloadavg()[0]:.1f}  \n"
            f"One update pass = `lowrank_update_` on every 2-d weight (lr {LR}, g {G}, weight decay "
            f"{lowrank_pass.WD}; bf16 rounded stochastically, fp32 to nearest); the copy moves the same bytes "
            f"(the weights are views of one buffer: one `dst.copy_(src)`) in the same run, each rep timing the copy "
            "then one pass per rank. Times: "
            f"median of {args.reps} reps (spread min..max); share of copy bandwidth = copy median / pass median, "
            "per-rep share = min..max of copy/pass within a rep.\n\n")
    replace_section(args.results, f"perturb-lowrank-{device.type}", head + lowrank_pass.table(rows))
    print(f"wrote {csv_path} and block perturb-lowrank-{device.type} of {args.results}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--sets", default="", help="comma-separated subset of tensor-set names")
    ap.add_argument("--backends", default="", help="comma-separated backends (default: every kernel backend "
                    "present; the pure-torch fallback only when named)")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    ap.add_argument("--distributions", default="gaussian,rademacher", help="comma-separated direction streams")
    ap.add_argument("--quick", action="store_true", help="two sets, 5 reps, no RESULTS.md update")
    ap.add_argument("--method", choices=["fused", "mezo-lowrank"], default="fused",
                    help="fused: the 3-pass step on the tensor sets; mezo-lowrank: the low-rank update pass")
    ap.add_argument("--ranks", default="1,4,16", help="mezo-lowrank: lowrank_r values")
    ap.add_argument("--models", default="", help="mezo-lowrank: comma-separated subset of "
                    "smollm2-135m, llama-1b-rand, opt-1.3b-rand")
    args = ap.parse_args(argv)
    if args.method == "mezo-lowrank":
        return lowrank_main(args, torch.device(args.device))
    dists = args.distributions.split(",")
    if args.quick:
        args.reps = min(args.reps, 5)
    device = torch.device(args.device)
    run = timer(device)
    bw = copy_bandwidth(device, run, args.reps)
    present = [n for n, why in mk.backends(device).items() if why is None]
    present = args.backends.split(",") if args.backends else [
        n for n in present if n != "torch" and not (n == "triton" and device.type == "cpu")]  # interpreter: not a speed
    rows, sign_ratios = [], []
    sets = tensor_sets(device)
    for name, shapes in sets.items():
        if args.sets and name not in args.sets.split(","):
            continue
        if args.quick and not args.sets and name not in (next(iter(sets)), list(sets)[-1]):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            params = make(shapes, dtype, device)
            ref = run(lambda: reference_step(params, 1), max(3, args.reps // 3))
            ref_ms = statistics.median(ref) * 1e3
            rows.append(dict(set=name, tensors=len(shapes), numel=sum(p.numel() for p in params),
                             dtype=str(dtype).split(".")[1], method="reference-loop", passes=4, launches="",
                             ms=ref_ms, ms_min=min(ref) * 1e3, ms_max=max(ref) * 1e3, gbps="", pct_copy="",
                             speedup=1.0))
            first = len(rows) - 1
            for backend in present:
                per_dist = {}
                for dist in dists:
                    why = unsupported_reason(backend, device, KernelMode.MASTER_UPDATE, dist)
                    if why is not None:
                        print(f"{name:>26} {backend}: no {dist} ({why})", flush=True)
                        continue
                    ps = mk.ParamSet(params, backend=backend, distribution=dist)
                    l0 = ps.launches
                    fused_step(ps, 0)
                    launches = (ps.launches - l0) // 3
                    ts = run(lambda: fused_step(ps, 2), args.reps)
                    med = per_dist[dist] = statistics.median(ts)
                    gbps = step_bytes(ps) / med / 1e9
                    method = (f"fused-{backend}" + ("+master" if ps.exact_restore else "")
                              + ("" if dist == "gaussian" else f" ({dist})"))
                    rows.append(dict(set=name, tensors=len(shapes), numel=ps.numel, dtype=str(dtype).split(".")[1],
                                     method=method, passes=3, launches=launches, ms=med * 1e3, ms_min=min(ts) * 1e3,
                                     ms_max=max(ts) * 1e3, gbps=round(gbps, 2),
                                     pct_copy=round(100 * gbps * 1e9 / bw, 1), speedup=round(ref_ms / (med * 1e3), 2)))
                if len(per_dist) == 2:
                    sign_ratios.append((name, str(dtype).split(".")[1], backend,
                                        per_dist["gaussian"] / per_dist["rademacher"]))
            print(*(f"{r['set']:>26} {r['dtype']:>8} {r['method']:>32} {r['ms']:9.3f} ms  x{r['speedup']}"
                    for r in rows[first:]), sep="\n", flush=True)
            for n, dt, b, x in sign_ratios:
                if n == name and dt == str(dtype).split(".")[1]:
                    print(f"{'':>26} {dt:>8} {b}: sign step {x:.2f}x faster than gaussian", flush=True)
            del params
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"perturb_{device.type}{'_quick' if args.quick else ''}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
    if args.quick:
        print(f"wrote {csv_path} (--quick: RESULTS.md untouched)")
        return
    label = device_label(device.type)
    head = (f"Command: `python bench/bench_perturb.py --device {device.type} --reps {args.reps}`  \n"
            f"Device: {label}; torch {torch.__version__}; date {datetime.date.today()}  \n"
            f"Copy bandwidth (read+write) measured on this device: {bw / 1e9:.1f} GB/s. "
            f"Times are the median over {args.reps} steps (reference: {max(3, args.reps // 3)}), spread min..max.\n\n"
            "| set | tensors | elements | dtype | method | passes | launches/pass | median ms | spread ms | GB/s | % copy BW | speedup vs ref |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['set']} | {r['tensors']} | {r['numel']} | {r['dtype']} | {r['method']} | {r['passes']} | "
                   f"{r['launches']} | {r['ms']:.3f} | {r['ms_min']:.3f}..{r['ms_max']:.3f} | {r['gbps']} | "
                   f"{r['pct_copy']} | {r['speedup']} |\n" for r in rows)
    if sign_ratios:
        body += ("\nSign (rademacher) vs gaussian directions, same backend and step: gaussian time / sign time.\n\n"
                 "| set | dtype | backend | sign speedup |\n|---|---|---|---|\n"
                 + "".join(f"| {n} | {dt} | {b} | {x:.2f} |\n" for n, dt, b, x in sign_ratios))
    replace_section(args.results, f"perturb-{device.type}", head + body)
    print(f"wrote {csv_path} and section perturb-{device.type} of {args.results}")


if __name__ == "__main__":
    main()
