"""Full-parameter MeZO with low-rank directions against two inference forwards (issue 21, item 6).

For each shape of the issue (SmolLM2-135M 4x128 fp32 and bf16; the 1B Llama and OPT-1.3B shapes 2x64 bf16 and
fp32), in a fresh process per method (``step_worker.py``, which also says what is timed and how memory is read):
``inference``, ``mezo-virtual`` (dense Gaussian directions, for comparison) and ``mezo-lowrank-r1/r4/r16``.

Targets (the issue's): a low-rank step <= 1.15 x two inference forwards, peak footprint <= 1.03 x inference.

Usage:  python bench/bench_lowrank.py [--models smollm2-135m] [--dtypes fp32,bf16] [--reps N] [--results F]
Writes bench/out/step_lowrank_cpu.csv and the section step-cpu-lowrank of RESULTS.md (CSV in bench/csv/).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import shlex
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from bench_perturb import device_label  # noqa: E402
from bench_step import FIELDS, run_worker, to_row  # noqa: E402
from results import replace_section  # noqa: E402

METHODS = ("inference", "mezo-virtual", "mezo-lowrank-r1", "mezo-lowrank-r4", "mezo-lowrank-r16")
SHAPES = [("smollm2-135m", 4, 128, ("fp32", "bf16"), 5), ("llama-1b-rand", 2, 64, ("bf16", "fp32"), 3),
          ("opt-1.3b-rand", 2, 64, ("bf16", "fp32"), 3)]
TIME_TARGET, MEMORY_TARGET = 1.15, 1.03
SECTION = "step-cpu-lowrank"


def cpu_flags() -> str:
    """The CPU flags that decide the kernels' speed (AVX-512, AMX, bf16), from /proc/cpuinfo."""
    keep = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
            "amx_tile", "amx_int8")
    try:
        line = next(x for x in open("/proc/cpuinfo") if x.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(line.split(":", 1)[1].split())
    return " ".join(f for f in keep if f in have) or "none of " + " ".join(keep)


def _f(row: dict, key: str) -> float | None:
    v = row.get(key, "")
    return None if v in ("", None) else float(v)


def table(rows: list[dict]) -> str:
    """One line per (configuration, MeZO method): median [min..max] ms, forwards / rest, and the two ratios."""
    out = ["| model | dtype | batch x seq | method | step ms (median [min..max]) | fwd / other ms | "
           "step / 2 inference | footprint / inference |", "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["dtype"], r["batch"], r["seq"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["model"], r["dtype"], r["batch"], r["seq"]) == key}
        inf = group.get("inference", {})
        t_inf, m_inf = _f(inf, "median_ms"), _f(inf, "footprint_mib")
        for method, r in group.items():
            if r["status"] != "ok":
                out.append(f"| {key[0]} | {key[1]} | {key[2]}x{key[3]} | {method} | {r['error']} | | | |")
                continue
            t, m = _f(r, "median_ms"), _f(r, "footprint_mib")
            ratio = "" if method == "inference" or not t_inf else f"{t / (2 * t_inf):.2f}"
            mem = "" if method == "inference" or not m_inf else f"{m / m_inf:.3f}"
            if method.startswith("mezo-lowrank") and ratio:
                ratio += " ✓" if float(ratio) <= TIME_TARGET else " ✗"
                mem += " ✓" if float(mem) <= MEMORY_TARGET else " ✗"
            out.append(f"| {key[0]} | {key[1]} | {key[2]}x{key[3]} | {method} | {t:.0f} [{_f(r, 'min_ms'):.0f}.."
                       f"{_f(r, 'max_ms'):.0f}] | {_f(r, 'fwd_ms'):.0f} / {_f(r, 'other_ms'):.0f} | {ratio} | {mem} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset of " + ", ".join(s[0] for s in SHAPES))
    ap.add_argument("--dtypes", help="comma-separated subset of fp32,bf16")
    ap.add_argument("--methods", help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--reps", type=int, help="timed steps per method (default 5 for SmolLM2, 3 for the 1B shapes)")
    ap.add_argument("--results", default=os.path.join(BENCH, "RESULTS.md"))
    ap.add_argument("--out", default=os.path.join(BENCH, "out"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of <out>/step_lowrank_cpu.csv that this run does not measure again")
    a = ap.parse_args(argv)
    pick = lambda arg: None if not arg else set(arg.split(","))  # noqa: E731
    models, dtypes, methods = pick(a.models), pick(a.dtypes), pick(a.methods)
    command = "python bench/bench_lowrank.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    cache = os.path.join(a.out, "cache")
    os.makedirs(cache, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for model, batch, seq, dts, reps in SHAPES:
        for dtype in dts:
            if (models and model not in models) or (dtypes and dtype not in dtypes):
                continue
            for method in METHODS:
                if methods and method not in methods:
                    continue
                cfg = dict(model=model, batch=batch, seq=seq, mode="full", dtype=dtype, method=method, device="cpu",
                           reps=a.reps or reps, warmup=1, cache_dir=cache)
                row = to_row(run_worker(cfg, a.timeout))
                rows.append(row)
                print(f"{model:>14} {dtype} {batch}x{seq} {method:>17} "
                      f"{row['median_ms'] if row['status'] == 'ok' else row['error']}", flush=True)
    wall = time.perf_counter() - t0
    csv_path, merged = os.path.join(a.out, "step_lowrank_cpu.csv"), ""
    if a.merge and os.path.exists(csv_path):
        with open(csv_path) as f:
            old = list(csv.DictReader(f))
        new = {(r["model"], r["dtype"], r["method"]): r for r in rows}
        rows = [new.pop((r["model"], r["dtype"], r["method"]), r) for r in old] + list(new.values())
        merged = " after `python bench/bench_lowrank.py`, whose rows it kept where it did not measure again"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader(); w.writerows(rows)
    import torch
    body = (f"Command: `{command}` ({wall / 60:.1f} min){merged}  \nDevice: {device_label('cpu')}; torch {torch.__version__}; "
            f"date {datetime.date.today()}; CPU flags {cpu_flags()}  \nFull-parameter steps, each method in a fresh process "
            "(`bench/step_worker.py`); times: median over the timed steps after one warm-up step, [min..max]; "
            "fwd / other: time in the two forwards / in the rest (U, V draws, 1-d tensors' copies, the update "
            "pass). footprint = weights + peak RSS over the loaded baseline. Targets (issue 21): a low-rank step "
            f"<= {TIME_TARGET} x two inference forwards (✓/✗), footprint <= {MEMORY_TARGET} x inference.\n\n"
            + table(rows) + "\n")
    replace_section(a.results, SECTION, body)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
