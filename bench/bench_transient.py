"""Peak memory of a full-parameter MeZO step against inference on a small Llama shape: what the virtual path's
transient buffers cost (issue #21, item 5).

The shape: ``llama-63m-rand``, a Llama architecture with random weights (hidden 768, 8 layers, 12 heads,
intermediate 2048, vocab 8192, tied embeddings: 62.9 M weights; the largest tensor is the 8192 x 768
embedding / LM head), bf16, a random token batch of 8 x 128, lr = 0 (so every method computes the same
forwards and no update pass writes the weights).

Methods, each in a fresh process (``python bench/bench_transient.py --worker <method>``):

* ``inference``: one no-grad forward;
* ``mezo-inplace-nomaster``: ``MeZO(..., perturb="inplace", exact_restore=False)``: ± written into the weights,
  no fp32 masters;
* ``mezo-virtual``: ``MeZO(..., perturb="virtual", model=model, rounding="stochastic")``.

Peak memory: peak RSS (VmHWM) over VmRSS after the model and the batch exist, reset with
``/proc/self/clear_refs`` after ``malloc_trim`` (``step_measure.reset_peak``); the optimizer is built after the
reset, so its state counts. The virtual method also reports its ``VirtualPerturbation``'s own accounting:
``peak_bytes`` (the largest total of transient buffers alive at once) and the arena it reserves per pass.

Usage:  python bench/bench_transient.py [--reps 3] [--results bench/RESULTS.md]
Writes the section ``virtual-transient-cpu`` of RESULTS.md (and its CSV, ``bench/results.py``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
# --root (a worker only): another tree's mezo_kernels, e.g. the code before a change, measured the same way
_ROOT = sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv[:-1] else os.path.dirname(BENCH)
sys.path[:0] = [BENCH, _ROOT]

KEY = "virtual-transient-cpu"
METHODS = ("inference", "mezo-inplace-nomaster", "mezo-virtual")
SHAPE = dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12, head_dim=64,
             intermediate_size=2048, vocab_size=8192, tie_word_embeddings=True, max_position_embeddings=512,
             rms_norm_eps=1e-5, hidden_act="silu")
BATCH, SEQ = 8, 128
MIB = 2**20


def build(seed: int = 0):
    """The bf16 ``llama-63m-rand`` model (eval mode, every weight trainable) and its token batch [8, 128]."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    return model, ids


def worker(method: str, reps: int, warmup: int) -> dict:
    """Measure one method in this process: peak RSS over the baseline after ``warmup`` + ``reps`` steps."""
    import torch
    from mezo_kernels.models import trainable_parameters
    from mezo_kernels.optim import MeZO
    from step_measure import read_peak, reset_peak
    cpu = torch.device("cpu")
    model, ids = build()
    trainable = trainable_parameters(model)
    largest = max(p.numel() * p.element_size() for _, p in trainable)

    def loss() -> float:
        return float(model(input_ids=ids, labels=ids).loss)

    base = reset_peak(cpu)
    opt = None
    if method == "mezo-inplace-nomaster":
        opt = MeZO(trainable, lr=0.0, eps=1e-3, seed=0, perturb="inplace", exact_restore=False)
    elif method == "mezo-virtual":
        opt = MeZO(trainable, lr=0.0, eps=1e-3, seed=0, perturb="virtual", model=model, rounding="stochastic")
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            lv = loss() if opt is None else opt.step(loss).loss_plus
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = read_peak(cpu)
    out = dict(method=method, status="ok", peak_over_base_mib=(peak - base) / MIB, baseline_mib=base / MIB,
               largest_mib=largest / MIB, n_params=sum(p.numel() for p in model.parameters()),
               median_s=sorted(times)[len(times) // 2], loss=lv, threads=torch.get_num_threads())
    vp = opt.virtual if opt is not None else None
    if vp is not None:
        out.update(vp_peak_mib=vp.peak_bytes / MIB,
                   vp_reserved_mib=getattr(vp, "peak_reserved_bytes", float("nan")) / MIB)
    return out


ALLOCATORS = {
    "glibc": {},                                   # the C allocator as it comes (dynamic mmap threshold)
    # every allocation of 64 KiB or more is a mapping of its own, unmapped when freed: RSS follows live memory,
    # so the figure no longer depends on what the heap kept from earlier allocations
    "mmap>=64KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def run_one(method: str, reps: int, warmup: int, allocator: str = "glibc", root: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(BENCH),
                                                                     os.environ.get("PYTHONPATH")])))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.update(ALLOCATORS[allocator])
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", method, "--reps", str(reps),
                        "--warmup", str(warmup)] + (["--root", root] if root else []),
                       capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "allocator": allocator, "code": "before" if root else "this tree"}
    tail = (p.stderr.strip().splitlines() or [""])[-1][:200]
    return dict(method=method, allocator=allocator, code="before" if root else "this tree", status="error",
                error=f"exit {p.returncode}: {tail}")


def cpu_flags() -> str:
    want = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_fp16",
            "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return f"{os.cpu_count()}-core \"{name}\", flags {' '.join(f for f in want if f in flags)}"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[dict]) -> str:
    """One line per (allocator, code, method): peak over base, median [min..max] over the runs, and its excess over
    inference (medians), in MiB and in copies of the largest tensor."""
    out = ["| allocator | code | method | runs | peak RSS over base MiB, median [min..max] | over inference MiB | "
           "over inference, in largest tensors | virtual: peak reserved MiB | step median s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for alloc in ALLOCATORS:
        def pick(code, m):
            return [r for r in rows if r["allocator"] == alloc and r.get("code") == code and r["method"] == m]
        inf = _med([r["peak_over_base_mib"] for r in pick("this tree", "inference") if r["status"] == "ok"])
        for code, m in [("this tree", m) for m in METHODS] + [("before", "mezo-virtual")]:
            every = pick(code, m)
            rs = [r for r in every if r["status"] == "ok"]
            if not rs:
                if every:
                    out.append(f"| {alloc} | {code} | {m} | 0 | {every[0]['status']}: {every[0].get('error', '')} "
                               "| | | | |")
                continue
            pk = [r["peak_over_base_mib"] for r in rs]
            over = _med(pk) - inf
            res = _med([r["vp_reserved_mib"] for r in rs if "vp_reserved_mib" in r])
            out.append(f"| {alloc} | {code} | {m} | {len(rs)} | {_med(pk):.1f} [{min(pk):.1f}..{max(pk):.1f}] | "
                       f"{over:+.1f} | {over / rs[0]['largest_mib']:+.2f} | "
                       f"{'' if res != res else f'{res:.1f}'} | {_med([r['median_s'] for r in rs]):.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per (allocator, method)")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS),
                    help=f"comma-separated subset of {', '.join(ALLOCATORS)}")
    ap.add_argument("--before", help="a folder holding the mezo_kernels package before a change: mezo-virtual is "
                                     "measured with it too, in the same runs (rows 'before')")
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--results", help="markdown file whose section is replaced (default: print only)")
    ap.add_argument("--note", default="", help="a sentence added under the table (machine load, ...)")
    a = ap.parse_args(argv)
    a.allocators = [x for x in a.allocators.split(",") if x]
    if any(x not in ALLOCATORS for x in a.allocators) or a.runs < 1 or a.reps < 1:
        raise SystemExit(f"bench_transient.py: error: --allocators from {', '.join(ALLOCATORS)}, --runs/--reps >= 1")
    if a.worker:
        print(json.dumps(worker(a.worker, a.reps, a.warmup)), flush=True)
        return
    import torch
    t0 = time.perf_counter()
    # interleaved (run 1 of every method, then run 2, ...), so a change in the box's load hits every method alike
    jobs = [(m, None) for m in METHODS] + ([("mezo-virtual", os.path.abspath(a.before))] if a.before else [])
    rows = [run_one(m, a.reps, a.warmup, alloc, root) for alloc in a.allocators for _ in range(a.runs)
            for m, root in jobs]
    ok = [r for r in rows if r["status"] == "ok"]
    largest = ok[0]["largest_mib"] if ok else float("nan")
    cmd = "python bench/bench_transient.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    body = (f"Command: `{cmd}` ({(time.perf_counter() - t0) / 60:.1f} min)  \n"
            f"Device: {cpu_flags()}; torch {torch.__version__}; date {datetime.date.today()}  \n"
            f"llama-63m-rand (hidden 768, 8 layers, intermediate 2048, vocab 8192, tied; "
            f"{ok[0]['n_params'] / 1e6 if ok else 0:.1f} M weights), bf16, batch {BATCH} x {SEQ}, lr = 0; each "
            f"(allocator, code, method) in {a.runs} fresh processes, interleaved, each running {a.warmup} warm-up + "
            f"{a.reps} timed steps. Peak memory: peak RSS (VmHWM) over VmRSS after the model is loaded (malloc_trim, "
            "then /proc/self/clear_refs); the optimizer is built after the reset. Largest tensor (embedding = LM "
            f"head): {largest:.1f} MiB in bf16. Allocators: `glibc` as it comes; `mmap>=64KiB` = "
            "`MALLOC_MMAP_THRESHOLD_=65536`, every allocation of 64 KiB or more its own mapping, unmapped when freed, "
            "so RSS follows live memory instead of what the heap kept. `before`: mezo-virtual with the package "
            "before the change (`--before`). Peak reserved: `VirtualPerturbation.peak_reserved_bytes`, the most "
            "transient memory a pass held at once (its arena whole, plus the buffers outside it).\n\n"
            + table(rows) + (f"\n{a.note}\n" if a.note else ""))
    print(body)
    if a.results:
        from results import replace_section
        replace_section(a.results, KEY, body)


if __name__ == "__main__":
    main()
