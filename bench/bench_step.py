"""Step benchmark: inference forward vs MeZO step (ours and the reference loop) vs backprop+AdamW (with and without
gradient checkpointing): time per step and peak memory, per model, batch, sequence length, mode and dtype.

Every (configuration, method) runs in a fresh subprocess (bench/step_worker.py; what is timed and how memory is
measured is in its docstring). A configuration that fails, runs out of memory or would not fit (the worker's
memory guard) is recorded with its reason; the rest of the grid goes on.

Usage:  python bench/bench_step.py --device cpu            (the whole default grid for the device)
        python bench/bench_step.py --quick                 (tiny-llama, about 2 min: a smoke run)
Writes <out>/step_<device>.csv (one row per configuration x method), the section step-<device> of RESULTS.md
(tables, ratios, targets) and step_time_<device>.png / step_memory_<device>.png next to RESULTS.md. A --quick run
without --results / --out writes all of that under bench/out/quick/ instead, never into bench/RESULTS.md.

Methods (step_worker.py): inference, mezo-inplace-master (old name mezo), mezo-inplace-nomaster (old name
mezo-inplace; bf16/fp16 only), mezo-virtual, the LoRA-only mezo-batched, mezo-n4 and mezo-batched-n4, reference,
backprop, backprop-ckpt. --methods takes the old names too.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import plot_step  # noqa: E402
import step_report  # noqa: E402
from bench_perturb import device_label  # noqa: E402
from results import replace_section  # noqa: E402
from step_models import MODELS  # noqa: E402
from step_worker import DEVICES, LORA_ONLY, LOW_PRECISION_ONLY, LOWRANK, METHODS, MODES  # noqa: E402
from step_report import METHOD_ALIASES, canonical  # noqa: E402

QUICK_DIR = "quick"                  # --quick without --results/--out writes under <default out>/quick/


def methods_for(mode: str, dtype: str) -> tuple[str, ...]:
    """The grid's methods of one configuration: the LoRA-only ones in mode lora, the no-master in-place path in
    bf16/fp16 only (in fp32 there are no masters: it is mezo-inplace-master)."""
    return tuple(m for m in METHODS if m not in LOWRANK and (mode == "lora" or m not in LORA_ONLY)
                 and (dtype != "fp32" or m not in LOW_PRECISION_ONLY))


def _cfgs(model, shapes, dtypes, reps, warmup, modes=MODES):
    return [dict(model=model, batch=b, seq=s, mode=mo, dtype=d, reps=reps, warmup=warmup,
                 methods=methods_for(mo, d))
            for d in dtypes for (b, s) in shapes for mo in modes]


# Sized for a 2-core, 24 GB CPU box (bf16 for the 1B-class models; see bench/RESULTS.md for the measured run time),
# and for one 80 GB GPU.
GRIDS = {
    "quick": _cfgs("tiny-llama", [(2, 32)], ["fp32"], reps=3, warmup=1),
    "cpu": (_cfgs("smollm2-135m", [(4, 128)], ["fp32", "bf16"], reps=5, warmup=1)
            + _cfgs("llama-1b-rand", [(2, 64)], ["bf16"], reps=3, warmup=1)
            + _cfgs("opt-1.3b-rand", [(2, 64)], ["bf16"], reps=3, warmup=1)),
    "cuda": (_cfgs("smollm2-135m", [(16, 256)], ["fp32", "bf16"], reps=10, warmup=3)
             + _cfgs("llama-1b-rand", [(8, 512)], ["bf16", "fp32"], reps=10, warmup=3)
             + _cfgs("opt-1.3b-rand", [(8, 512)], ["bf16", "fp32"], reps=10, warmup=3)),
}
FIELDS = ("model", "mode", "dtype", "batch", "seq", "method", "device", "status", "error", "median_ms", "min_ms",
          "max_ms", "q1_ms", "q3_ms", "iqr_ms", "fwd_ms", "other_ms", "tokens_per_s", "peak_over_base_mib",
          "footprint_mib", "peak_abs_mib", "weights_mib", "baseline_mib", "n_params", "n_trainable", "reps",
          "warmup", "loss", "load_s", "wall_s", "threads", "attn", "mem_method")


def _list(arg: str | None, allowed, what: str) -> list[str] | None:
    if not arg:
        return None
    items = [x.strip() for x in arg.split(",") if x.strip()]
    if what == "method":
        items = [canonical(x) for x in items]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"bench_step.py: error: unknown {what} {', '.join(map(repr, bad))}; "
                         f"choose from {', '.join(allowed)}")
    return items


def run_worker(cfg: dict, timeout: float) -> dict:
    """Run one (configuration, method) in a fresh interpreter; a crash, a kill or a timeout becomes an error row."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(BENCH),
                                                                     os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, os.path.join(BENCH, "step_worker.py"), json.dumps(cfg)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "status": "error", "error": f"timeout after {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "wall_s": wall}
    why = (f"killed by {signal.Signals(-p.returncode).name} (out of memory?)" if p.returncode < 0
           else f"exit {p.returncode}")
    tail = p.stderr.strip().splitlines()[-1:] or [""]
    return {**cfg, "status": "error", "error": f"{why}: {tail[0][:200]}", "wall_s": wall}


def to_row(res: dict) -> dict:
    """The CSV row of a worker result (times in ms)."""
    row = {k: res.get(k, "") for k in FIELDS}
    for k in ("median", "min", "max", "q1", "q3", "iqr", "fwd", "other"):
        v = res.get(f"{k}_s")
        row[f"{k}_ms"] = "" if v is None else v * 1e3
    return row


def auto_line(rows: list[dict], device: str) -> str:
    """What ``--dtype auto`` picks for each model of the grid on this machine: its rule (``dtype.choose``: the CPU's
    bf16 flags, bf16 at most 0.8 x the fp32 time; bf16 on a GPU) applied to the grid's own fp32 and bf16 inference
    rows of the same model and shape (the plain model: mode full, else lora). '' where no model has both."""
    from mezo_kernels.train.dtype import choose
    ms: dict = {}
    for r in sorted(rows, key=lambda r: r["mode"] != "full"):          # full-mode rows first
        if r["method"] == "inference" and r["status"] == "ok" and r["dtype"] in ("fp32", "bf16"):
            ms.setdefault((r["model"], r["batch"], r["seq"]), {}).setdefault(r["dtype"], float(r["median_ms"]))
    picks = [f"{m} {b}x{q}: {choose('auto', device, lambda t=t: (t['fp32'] / 1e3, t['bf16'] / 1e3)).reason}"
             for (m, b, q), t in ms.items() if len(t) == 2]
    return f"`--dtype auto` here, from the inference rows: {'; '.join(picks)}.\n\n" if picks else ""


def section(rows: list[dict], device: str, command: str, wall_s: float) -> str:
    import torch
    import transformers
    rs = step_report.ratios(rows)
    mem = ("peak RSS (VmHWM) over VmRSS after the model is loaded, reset with /proc/self/clear_refs"
           if device == "cpu" else "torch.cuda.max_memory_allocated over memory_allocated after the model is loaded")
    return (f"Command: `{command}` ({wall_s / 60:.1f} min)  \n"
            f"Device: {device_label(device)}; torch {torch.__version__}; transformers {transformers.__version__}; "
            f"date {datetime.date.today()}  \n"
            f"Each (configuration, method) in a fresh process; times: median over the timed steps after the "
            f"warm-up, spread [min..max] and IQR; tokens/s = batch x seq / median step time; fwd / other ms: "
            "median time inside a step spent in forwards / in the rest (perturbation passes, backward, optimizer). "
            f"Peak memory: {mem}; "
            "the optimizer is built after the reset, so its state counts. footprint = weights + peak over base "
            "(the ratios use it). Same random token batch for every method; loss = causal-LM loss, labels = input "
            "ids. LoRA: r=8, alpha=16 on q_proj/v_proj. AdamW moments in the weights' dtype. MeZO paths: "
            "`mezo-inplace-master` = ± written into the weights, fp32 masters in bf16/fp16 (named `mezo` in earlier "
            "runs; \"MeZO\" in the first ratio tables); `mezo-inplace-nomaster` = the same without masters "
            "(`exact_restore=False`, named `mezo-inplace` earlier), bf16 only; `mezo-virtual` = "
            "`perturb=\"virtual\"`: the ± passes write nothing, no masters, stochastically rounded updates; "
            "LoRA only: `mezo-batched` = `step_batched`, L+ and L- from one forward of 2B rows, `mezo-n4` / "
            "`mezo-batched-n4` = 4 directions, virtual, sequential (8 forwards of B rows) / one forward of 8B rows. "
            "llama-1b-rand / opt-1.3b-rand: random weights, real architectures (bench/step_models.py).\n\n"
            + auto_line(rows, device) + step_report.result_table(rows)
            + "\nRatios per configuration (✓/✗: target met/missed; definitions in bench/step_report.py):\n\n"
            + step_report.ratio_tables(rs, device) + "\nTargets:\n\n" + step_report.target_summary(rs, device)
            + f"\n![step time, {device}](step_time_{device}.png)\n![peak memory, {device}](step_memory_{device}.png)\n")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=DEVICES)
    ap.add_argument("--quick", action="store_true",
                    help="tiny-llama only, about 2 min (a smoke run); without --results/--out it writes under "
                         f"bench/out/{QUICK_DIR}/, not into bench/RESULTS.md")
    ap.add_argument("--reps", type=int, help="timed steps per method (default: per model, see GRIDS)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: per model)")
    ap.add_argument("--models", help=f"comma-separated subset of the grid's models ({', '.join(MODELS)})")
    ap.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)} (old names "
                                      f"{', '.join(f'{k} = {v}' for k, v in METHOD_ALIASES.items())})")
    ap.add_argument("--modes", help="comma-separated subset of lora,full")
    ap.add_argument("--results", help="markdown file whose step-<device> section is replaced (default "
                                      "bench/RESULTS.md; --quick: <out>/RESULTS.md)")
    ap.add_argument("--out", help=f"folder of the CSV and the model cache (default bench/out; --quick: "
                                  f"bench/out/{QUICK_DIR})")
    ap.add_argument("--cache-dir", help="model cache (default <out>/cache; see step_models.py)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per (configuration, method)")
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = os.path.join(BENCH, "out", QUICK_DIR) if a.quick and a.results is None else os.path.join(BENCH, "out")
    if a.results is None:
        a.results = os.path.join(a.out, "RESULTS.md") if a.quick else os.path.join(BENCH, "RESULTS.md")
    a.models = _list(a.models, MODELS, "model")
    a.methods = _list(a.methods, METHODS, "method")
    a.modes = _list(a.modes, MODES, "mode")
    for k in ("reps", "warmup"):
        if getattr(a, k) is not None and getattr(a, k) < (1 if k == "reps" else 0):
            raise SystemExit(f"bench_step.py: error: --{k} must be >= {1 if k == 'reps' else 0}")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("bench_step.py: error: --device cuda, but torch.cuda.is_available() is False")
    grid = GRIDS["quick" if a.quick else a.device]
    if a.models:
        missing = [m for m in a.models if m not in {c["model"] for c in grid}]
        if missing:
            raise SystemExit(f"bench_step.py: error: {', '.join(missing)} not in the "
                             f"{'quick' if a.quick else a.device} grid "
                             f"({', '.join(dict.fromkeys(c['model'] for c in grid))})")
    return a


def main(argv=None) -> list[dict]:
    a = parse(argv)
    command = "python bench/bench_step.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    cache = a.cache_dir or os.path.join(a.out, "cache")
    os.makedirs(cache, exist_ok=True)
    t0, rows = time.perf_counter(), []
    for c in GRIDS["quick" if a.quick else a.device]:
        if (a.models and c["model"] not in a.models) or (a.modes and c["mode"] not in a.modes):
            continue
        for method in c["methods"]:
            if a.methods and method not in a.methods:
                continue
            cfg = {k: v for k, v in c.items() if k != "methods"}
            cfg.update(method=method, device=a.device, cache_dir=cache,
                       **{k: getattr(a, k) for k in ("reps", "warmup") if getattr(a, k) is not None})
            row = to_row(run_worker(cfg, a.timeout))
            rows.append(row)
            what = (f"{row['median_ms']:10.1f} ms  footprint {row['footprint_mib']:8.0f} MiB"
                    if row["status"] == "ok" else step_report.failure(row))
            print(f"{c['model']:>14} {c['mode']:>4} {c['dtype']:>4} {c['batch']}x{c['seq']:<4} {method:>21}  "
                  f"{what}  ({row['wall_s']:.0f} s)", flush=True)
    if not rows:
        raise SystemExit("bench_step.py: error: the filters left no configuration to run")
    wall = time.perf_counter() - t0
    os.makedirs(a.out, exist_ok=True)
    csv_path = os.path.join(a.out, f"step_{a.device}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader(); w.writerows(rows)
    rs = step_report.ratios(rows)
    print("\n" + step_report.result_table(rows) + "\n" + step_report.ratio_tables(rs, a.device) + "\n"
          + step_report.target_summary(rs, a.device))
    replace_section(a.results, f"step-{a.device}", section(rows, a.device, command, wall))
    pngs = plot_step.plot(rows, a.device, os.path.dirname(os.path.abspath(a.results)))
    print(f"wrote {csv_path}, section step-{a.device} of {a.results}, {', '.join(pngs)} ({wall:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
