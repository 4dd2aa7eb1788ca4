"""The fused 3-pass MeZO step on the CPU kernel, quiet and under three kinds of load on the same machine.

One step is ``perturb_(+eps)``, ``perturb_(-eps)``, ``restore_update_`` on a ParamSet (as bench_perturb.py). It is
timed on the SmolLM2-135M LoRA set (q/v, r=8: 120 small tensors) and on one 2**24-element fp32 tensor, with:

| load    | what else runs                                                                             |
|---------|--------------------------------------------------------------------------------------------|
| quiet   | nothing we start                                                                           |
| spin1   | another process spinning in Python, pinned to one core                                     |
| intraop | a thread of this process running 512x512 matmuls: torch's intra-op threads busy, as in a training step |
| omp2    | another process running 2-thread torch (OpenMP) matmuls: a second OpenMP job                |

Each figure: median of ``--reps`` steps with p10/p90/min/max, and the ratio of the median to the quiet median.
The CPU model, its vector flags (avx512f, avx2) and the thread count are printed and written to every CSV row.

Usage:  python bench/bench_cpu_load.py [--quick] [--reps N] [--loads quiet,spin1,...] [--out bench/out]
Writes <out>/cpu_load.csv and prints a markdown table (it does not touch RESULTS.md).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mezo_kernels as mk  # noqa: E402
from bench_perturb import cpu_name, fused_step  # noqa: E402
from tensor_sets import make, tensor_sets  # noqa: E402

LOADS = ("quiet", "spin1", "intraop", "omp2")
SETS = ("smollm2-135m-lora-qv-r8", f"full-{2**24}")
_SPIN = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\nwhile True: pass"
_OMP2 = ("import torch; torch.set_num_threads(2); a = torch.randn(512, 512)\n"
         "while True: a @ a")


def cpu_flags() -> str:
    """The vector extensions the kernel can use here: 'avx512f avx2', 'avx2' or 'none'."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(x for x in ("avx512f", "avx2") if x in flags) or "none"


class Load:
    """Context manager that runs one kind of background load (LOADS) until exit."""

    def __init__(self, kind: str):
        if kind not in LOADS:
            raise ValueError(f"unknown load {kind!r}; expected one of {', '.join(LOADS)}")
        self.kind, self.proc, self.thread, self.stop = kind, None, None, threading.Event()

    def __enter__(self):
        if self.kind in ("spin1", "omp2"):
            env = dict(os.environ, OMP_NUM_THREADS="2") if self.kind == "omp2" else None
            self.proc = subprocess.Popen([sys.executable, "-c", _SPIN if self.kind == "spin1" else _OMP2], env=env)
        elif self.kind == "intraop":
            def loop(a=torch.randn(512, 512)):
                while not self.stop.is_set():
                    a @ a
            self.thread = threading.Thread(target=loop, daemon=True)
            self.thread.start()
        time.sleep(0.0 if self.kind == "quiet" else 1.0)  # let the load reach steady state (omp2 imports torch)
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"load {self.kind} exited early with {self.proc.returncode}")
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def time_steps(ps: mk.ParamSet, reps: int, warmup: int = 2) -> list[float]:
    """Seconds per fused step (3 passes), ``reps`` times after ``warmup`` untimed steps."""
    for i in range(warmup):
        fused_step(ps, i)
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fused_step(ps, warmup + i)
        out.append(time.perf_counter() - t0)
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure(sets: list[str], loads: list[str], reps: int, backend: str = "cpu") -> list[dict]:
    """One row per (set, load): step times in ms (median, p10, p90, min, max) and x_quiet (median / quiet median)."""
    shapes = tensor_sets(torch.device("cpu"))
    unknown = [s for s in sets if s not in shapes]
    if unknown:
        raise ValueError(f"unknown tensor sets {unknown}; expected some of {', '.join(shapes)}")
    label = dict(cpu=cpu_name(), flags=cpu_flags(), threads=torch.get_num_threads(),
                 date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    rows = []
    for name in sets:
        ps = mk.ParamSet(make(shapes[name], torch.float32, torch.device("cpu")), backend=backend)
        quiet = None
        for kind in loads:
            with Load(kind):
                ts = [t * 1e3 for t in time_steps(ps, reps)]
            med = statistics.median(ts)
            quiet = med if kind == "quiet" else quiet
            rows.append(dict(label, set=name, tensors=len(shapes[name]), numel=ps.numel, load=kind, reps=reps,
                             median_ms=round(med, 4), p10_ms=round(_pct(ts, 0.1), 4), p90_ms=round(_pct(ts, 0.9), 4),
                             min_ms=round(min(ts), 4), max_ms=round(max(ts), 4),
                             x_quiet=round(med / quiet, 2) if quiet else ""))
            print(f"{name:>26} {kind:>8} {med:10.3f} ms  (p10 {rows[-1]['p10_ms']}, p90 {rows[-1]['p90_ms']})",
                  flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"CPU: {rows[0]['cpu']} ({rows[0]['flags']}), {rows[0]['threads']} torch threads, {rows[0]['date']}\n\n"
            "| set | load | median ms | p10-p90 ms | min-max ms | x quiet |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(f"| {r['set']} | {r['load']} | {r['median_ms']:.3f} | "
                            f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} | "
                            f"{r['x_quiet']} |" for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run of about a minute)")
    ap.add_argument("--reps", type=int, help="timed steps per (set, load); default 30, 5 with --quick")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated tensor sets (bench/tensor_sets.py)")
    ap.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated subset of {', '.join(LOADS)}; "
                    "quiet first gives the x quiet column")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    a = ap.parse_args(argv)
    reps = a.reps or (5 if a.quick else 30)
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    rows = measure(a.sets.split(","), a.loads.split(","), reps, a.backend)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "cpu_load.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{table(rows)}\n\nwrote {path}")


if __name__ == "__main__":
    main()
