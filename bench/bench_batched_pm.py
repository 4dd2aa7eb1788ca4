"""Batched ± step (LoRA) against the sequential one: one forward of 2·n·B rows vs 2·n forwards of B rows.

Model: SmolLM2-135M fp32 (``models.load_model``), LoRA r=8 on q_proj/v_proj from ``--first-layer``; batch: the
first ``--batch`` SST-2 training examples through the causal objective (the MeZO OPT template), run by the forward
engine (``--engine reuse``) or the plain transformers forward (``--engine plain``). Methods, per n:

* ``seq-inplace``: ``MeZO.step(closure)``, perturbation written into the weights (``perturb="inplace"``);
* ``seq-virtual``: the same with ``perturb="virtual"`` (the weights never written), when the optimizer has it;
* ``batched``: ``batched_pm.batched_pm_losses`` (2·n row groups in one forward) and the update, one
  ``ParamSet.update_`` per direction (what a virtual step writes).

Times: median and [min..max] of ``--reps`` steps after one warm-up, in one process, methods interleaved per rep.
First the losses of n = 4 directions, batched against sequential (exact perturbed weights), as a check.
Usage: ``python bench/bench_batched_pm.py --n 1 4 --reps 7 3``
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mezo_kernels.tasks import data, objectives, registry as tasks
from mezo_kernels import models
from mezo_kernels.train.batched_pm import batched_pm_losses, pm_grads
from mezo_kernels.forward.engine import ForwardEngine
from mezo_kernels.optim import MeZO
from mezo_kernels.perturb import ParamSet


def _setup(a):
    model, tok, _ = models.load_model(a.model)
    model = models.add_lora(model, r=8, alpha=16, first_layer=a.first_layer)
    task = tasks.get_task("sst2")
    batch = data.read_glue_tsv(f"{a.data_dir}/sst2/train.tsv", task)[:a.batch]
    engine = ForwardEngine(eval_cache=False) if a.engine == "reuse" else None
    return model, objectives.CausalLMObjective(tok, task, engine=engine), batch


def _methods(model, obj, batch, n, max_rows=None, virtual=True):
    params = models.trainable_parameters(model)
    closure = lambda: obj(model, batch).loss.item()       # noqa: E731
    out = {}
    opt_in = MeZO(params, lr=1e-6, eps=1e-3, n_directions=n, perturb="inplace")
    out["seq-inplace"] = lambda: opt_in.step(closure)
    opt_v = None
    try:
        if not virtual:
            raise ValueError("not asked for")
        opt_v = MeZO(params, lr=1e-6, eps=1e-3, n_directions=n, perturb="virtual", model=model)
        out["seq-virtual"] = lambda: opt_v.step(closure)
    except (TypeError, ValueError):
        pass
    sets = (opt_v or opt_in).param_sets
    step = [0]

    def batched(rows):
        seeds = [opt_in.seed_for(step[0], j) for j in range(n)]
        grads = pm_grads(batched_pm_losses(model, obj, batch, seeds, 1e-3, sets, max_rows=rows), 1e-3)
        valid = [(s, g) for s, (g, skip) in zip(seeds, grads) if skip is None]
        for s, g in valid:
            for ps in sets:
                ps.update_(s, 1e-6, g / len(valid))
        step[0] += 1

    out["batched"] = lambda: batched(None)
    if max_rows:
        out[f"batched-max{max_rows}"] = lambda: batched(max_rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--first-layer", type=int, default=0)
    ap.add_argument("--engine", choices=("reuse", "plain"), default="reuse")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-rows", type=int, help="also time the batched step in forwards of at most this many rows")
    ap.add_argument("--no-virtual", action="store_true", help="skip seq-virtual")
    ap.add_argument("--reps", type=int, nargs="+", default=[5], help="timed steps per n (one value: every n)")
    a = ap.parse_args(argv)
    reps = dict(zip(a.n, a.reps * len(a.n) if len(a.reps) == 1 else a.reps))
    torch.manual_seed(0)
    model, obj, batch = _setup(a)
    rows = obj.encode(batch)["input_ids"]
    print(f"{a.model} fp32 LoRA r=8 q/v from layer {a.first_layer}, batch {a.batch} (rows {tuple(rows.shape)}), "
          f"engine {a.engine}, threads {torch.get_num_threads()}")
    with torch.no_grad():
        seeds = [101, 202, 303, 404]
        ps = ParamSet(models.trainable_parameters(model), exact_restore=True)
        seq = []
        for s in seeds:                                   # the sequential path's losses, exact perturbed weights
            for off in (1e-3, -1e-3):
                with ps.perturbed(s, off):
                    seq.append(obj(model, batch).loss.item())
        bat = [x for pair in batched_pm_losses(model, obj, batch, seeds, 1e-3, ps) for x in pair]
        print(f"n=4 losses: max |batched - sequential| = {max(abs(x - y) for x, y in zip(seq, bat)):.2e} "
              f"(losses {min(seq):.4f}..{max(seq):.4f})", flush=True)
        fwd = lambda: obj(model, batch)                   # noqa: E731
        for n in a.n:
            methods = {"forward": fwd, **_methods(model, obj, batch, n, a.max_rows, not a.no_virtual)}
            times: dict[str, list[float]] = {k: [] for k in methods}
            for rep in range(reps[n] + 1):
                for name, f in methods.items():
                    t0 = time.perf_counter()
                    f()
                    if rep:
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            for k, v in times.items():
                print(f"n={n} {k:12s} median {med[k]:.3f} s [{min(v):.3f}..{max(v):.3f}]  "
                      f"= {med[k] / med['forward']:.2f} forwards", flush=True)
            for k in ("seq-inplace", "seq-virtual"):
                for b in [m for m in med if m.startswith("batched")]:
                    if k in med:
                        print(f"n={n} {b} / {k} = {med[b] / med[k]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
