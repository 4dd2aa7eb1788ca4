"""Compute-matched fine-tuning quality: MeZO against backprop (AdamW) at equal budgets, one run per call.

Budgets are wall-clock minutes of the quiet machine: a step of a method costs ``--step-seconds``, the median
that ``--measure`` reports for the same model, task, method and batch on that machine, so runs can share the CPU
(one thread each) without their budgets depending on the load. Evaluation is not counted in the budget. The
records also give forward-equivalents (FE: one no-gradient forward of ``--batch-size`` rows, ``--sec-per-fe``
seconds): a MeZO step is 2 * n_directions forwards, a backprop step about 2.3 (LoRA) to 5.5 (full) of them.

Every ``--eval-every`` seconds the k-shot dev split (sampled from train, never the reported split) is evaluated and the
best weights kept (``selection.BestWeights``: accuracy, then loss). At each budget in ``--budgets-min`` the best
weights so far are evaluated on the reported split (``test``: for SST-2/RTE under the k-shot protocol, the GLUE
dev set). A run stops at the last budget, or earlier when the dev split has not improved for ``--patience`` seconds;
the budgets after such a stop report the same selected weights. One JSON line per budget goes to ``--out``, with
``dev_curve``: the dev accuracy and loss of the weights at every evaluation so far (the last is the weights a
run without selection would report).

    .venv/bin/python bench/bench_quality.py --measure --method mezo-lora bp-lora --data-dir ../shared/data
    .venv/bin/python bench/bench_quality.py --method mezo-lora --lr 1e-3 --seed 0 --step-seconds 1.81 \\
        --budgets-min 5 10 --data-dir ../shared/data --out bench/out/quality/runs.jsonl

Methods: ``zeroshot``, ``icl``, ``mezo-lora``, ``mezo-full``, ``bp-lora``, ``bp-full`` (LoRA r=8, alpha 16 on q/v, as
the demo). ``--distribution``, ``--n-directions``, ``--eps`` and ``--objective`` give the MeZO ablations. ``icl``
trains nothing: ``--icl-k`` train demonstrations (balanced, seeded; mezo_kernels/tasks/icl.py) before every prompt,
evaluated like ``zeroshot`` (one row at budget 0, with the prompt's ``icl`` facts and the engine's ``forward`` stats).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mezo_kernels.tasks import data, objectives
from mezo_kernels.tasks.icl import icl_objective
from mezo_kernels.optim import MeZO
from mezo_kernels.train.selection import BestWeights
from mezo_kernels.train.config import TrainConfig
from mezo_kernels.train.dtype import DEFAULT as DEFAULT_DTYPE, DTYPES, load_model
from mezo_kernels.train.loop import batch_for, build, evaluate

METHODS = ("zeroshot", "icl", "mezo-lora", "mezo-prefix", "mezo-full", "bp-lora", "bp-full")


def setup(a: argparse.Namespace, method: str):
    """(model, objective, trainable params, splits) for ``method`` with the demo's model and LoRA settings."""
    cfg = TrainConfig(task=a.task, model=a.model, data_dir=a.data_dir, k=a.k, seed=a.seed,
                      lora=not method.endswith("full") and method != "icl", max_length=a.max_length,
                      prefix_reuse=method.startswith("mezo") or method in ("zeroshot", "icl"), dtype=a.dtype,
                      prefix_tokens=a.prefix_tokens if method == "mezo-prefix" else None)
    splits = data.load_task_splits(cfg.task, cfg.data_dir, cfg.protocol, cfg.k, cfg.seed)
    *loaded, choice = load_model(cfg.model, cfg.dtype, seed=cfg.seed, seq=cfg.max_length)   # auto: decided here
    a.dtype_ran = choice.dtype                                   # what the rows record
    model, _, task, obj, params = build(cfg, loaded=loaded)
    if method == "icl":                 # the base model, K train demonstrations before every prompt
        obj = icl_objective(obj, task, splits.train, a.icl_k, a.seed, a.icl_max_length, model=model)
    return model, obj, params, splits


class Learner:
    """One training method: ``step(batch)`` does one update and returns its cost in quiet-machine seconds."""

    def __init__(self, a: argparse.Namespace, method: str, model, obj, params) -> None:
        self.method, self.model, self.obj = method, model, obj
        self.tensors = [p for _, p in params]
        total = total_steps(a)
        self.sched = None
        if method.startswith("mezo"):
            self.opt = MeZO(params, lr=a.lr, eps=a.eps, seed=a.seed, n_directions=a.n_directions, model=model,
                            distribution=a.distribution, schedule=a.schedule,
                            total_steps=total if a.schedule == "linear" else None,
                            lowrank_r=a.lowrank_r if a.distribution == "lowrank" else None)
            self.loss = objectives.scalar_objective(obj, a.objective)
        else:
            self.opt = torch.optim.AdamW(self.tensors, lr=a.lr, weight_decay=0.0)
            if a.schedule == "linear":      # the factor MeZO's own linear schedule applies: 1 - step / total
                self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: max(0.0, 1.0 - t / total))
        self.cost = a.step_seconds
        self.zero_g = 0

    def step(self, batch) -> float:
        if self.method.startswith("mezo"):
            with torch.no_grad():
                res = self.opt.step(lambda: self.loss(self.model, batch))
            self.zero_g += int(res.grad == 0.0)
        else:
            self.model.train(False)             # no dropout: both methods see the same deterministic forward
            self.opt.zero_grad(set_to_none=True)
            out = self.obj(self.model, batch)
            out.loss.backward()
            self.opt.step()
            if self.sched is not None:
                self.sched.step()
        return self.cost


def total_steps(a: argparse.Namespace) -> int:
    """Steps the largest budget buys: the horizon a linear schedule decays to 0 over (measure: its own steps)."""
    if a.measure or not a.step_seconds:
        return a.measure_steps + 1
    return max(1, math.ceil(max(a.budgets_min) * 60.0 / a.step_seconds))


def eval_best(best: BestWeights, tensors, model, obj, examples, bs: int, evaluate=evaluate) -> dict:
    """The reported-split metrics of the kept best weights; the current weights are put back afterwards."""
    if best.best is None:
        return evaluate(model, obj, examples, bs)
    current = [t.detach().clone() for t in tensors]
    best.restore()
    try:
        return evaluate(model, obj, examples, bs)
    finally:
        with torch.no_grad():
            for t, c in zip(tensors, current):
                t.copy_(c)


def run(a: argparse.Namespace, emit=lambda row: None) -> list[dict]:
    """Train one run; ``emit(row)`` is called with each budget's row as soon as it is scored (a 60-minute run that
    is stopped still keeps its 15- and 30-minute rows)."""
    method = a.method[0]
    model, obj, params, splits = setup(a, method)
    test = data.subsample(splits.test, a.test_max, a.seed)
    base = {"method": method, "task": a.task, "k": a.k, "seed": a.seed, "lr": a.lr, "eps": a.eps,
            "batch_size": a.batch_size, "max_length": a.max_length, "objective": a.objective,
            "distribution": a.distribution, "n_directions": a.n_directions, "step_seconds": a.step_seconds,
            "schedule": a.schedule,
            **({"lowrank_r": a.lowrank_r} if a.distribution == "lowrank" else {}),
            **({"prefix_tokens": a.prefix_tokens} if method == "mezo-prefix" else {}),
            "sec_per_fe": a.sec_per_fe, "dtype": a.dtype_ran,
            "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine()}
    if method == "zeroshot":
        dev = evaluate(model, obj, splits.dev, a.eval_batch_size)
        return [dict(base, budget_min=0, seconds=0, fe=0, steps=0, dev=dev,
                     test=evaluate(model, obj, test, a.eval_batch_size))]
    if method == "icl":
        info = {**obj.info(), **obj.check_fits([*splits.dev, *test])}
        dev = evaluate(model, obj, splits.dev, a.eval_batch_size)
        res = evaluate(model, obj, test, a.eval_batch_size)
        return [dict(base, budget_min=0, seconds=0, fe=0, steps=0, dev=dev, test=res, icl=info,
                     forward=obj.engine.stats.as_dict())]
    learner = Learner(a, method, model, obj, params)
    best = BestWeights(params)
    budgets = sorted(a.budgets_min)
    limits = [m * 60.0 for m in budgets]
    spent, steps, next_eval, last_gain, rows, stopped = 0.0, 0, a.eval_every, 0.0, [], "budget"
    curve: list[list] = []                       # [step, dev accuracy, dev loss] of the weights at each evaluation
    t0 = time.perf_counter()
    while limits and spent < limits[-1]:
        spent += learner.step(batch_for(splits.train, steps, a.seed, a.batch_size))
        steps += 1
        if spent >= next_eval or spent >= limits[0]:
            next_eval = spent + a.eval_every
            ev = evaluate(model, obj, splits.dev, a.eval_batch_size)
            curve.append([steps, ev["accuracy"], round(ev["loss"], 5)])
            if best.offer(steps, ev):
                last_gain = spent
            print(f"{method} lr={a.lr} seed={a.seed} step {steps} quiet-s {spent:.0f} dev {best.best['accuracy']:.3f}"
                  f"@{best.best_step} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        while limits and (spent >= limits[0] or spent - last_gain >= a.patience):
            if spent < limits[0]:
                stopped = "patience"
            m = budgets[len(rows)]
            rows.append(dict(base, budget_min=m, seconds=round(spent, 1), steps=steps,
                             wall_s=round(time.perf_counter() - t0),
                             fe=round(spent / a.sec_per_fe, 1) if a.sec_per_fe else None,
                             best_step=best.best_step, dev=best.best, dev_curve=list(curve), stopped=stopped,
                             zero_grad_rate=learner.zero_g / steps if method.startswith("mezo") else None,
                             test=eval_best(best, learner.tensors, model, obj, test, a.eval_batch_size)))
            emit(rows[-1])
            limits.pop(0)
            if stopped == "patience":       # every later budget reports the same selected weights
                for m2 in budgets[len(rows):]:
                    rows.append(dict(rows[-1], budget_min=m2))
                    emit(rows[-1])
                limits.clear()
    return rows


def measure(a: argparse.Namespace) -> list[dict]:
    """Median seconds of a no-grad forward, a MeZO step and a backprop step at ``--batch-size`` rows."""
    rows = []
    for method in a.method:
        model, obj, params, splits = setup(a, method)
        learner = Learner(a, method, model, obj, params) if method not in ("zeroshot", "icl") else None
        fwd, stepped = [], []
        for i in range(a.measure_steps + 1):
            batch = batch_for(splits.train, i, a.seed, a.batch_size)
            t = time.perf_counter()
            with torch.no_grad():
                obj(model, batch)
            t1 = time.perf_counter()
            if learner is not None:
                learner.step(batch)
            t2 = time.perf_counter()
            if i:                                                    # the first call warms up
                fwd.append(t1 - t)
                stepped.append(t2 - t1)
        f = statistics.median(fwd)
        row = {"method": method, "task": a.task, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
               "dtype": a.dtype_ran, "fwd_s": round(f, 4), "fwd_spread": [round(min(fwd), 4), round(max(fwd), 4)],
               "date": time.strftime("%Y-%m-%d")}
        if learner is not None:
            s = statistics.median(stepped)
            row.update(step_s=round(s, 4), step_spread=[round(min(stepped), 4), round(max(stepped), 4)],
                       step_fe=round(s / f, 3))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def method_untrained(a: argparse.Namespace) -> bool:
    return a.method[0] in ("zeroshot", "icl")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", nargs="+", choices=METHODS, required=True)
    p.add_argument("--measure", action="store_true", help="time forward / step per method instead of training")
    p.add_argument("--measure-steps", type=int, default=8)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--schedule", default="constant", choices=["constant", "linear"],
                   help="lr schedule: constant, or linear decay to 0 at the largest budget's step count")
    p.add_argument("--n-directions", type=int, default=1)
    p.add_argument("--distribution", default="gaussian", choices=["gaussian", "rademacher", "lowrank"])
    p.add_argument("--lowrank-r", type=int, default=1, help="--distribution lowrank: the rank r")
    p.add_argument("--prefix-tokens", type=int, default=5, help="mezo-prefix: learned prefix tokens")
    p.add_argument("--objective", default="ce", choices=["ce", "neg_accuracy"])
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES,
                   help="compute dtype (as mezo-kernels train --dtype; auto decided once per run, the rows record "
                        "the one that ran); default %(default)s")
    p.add_argument("--icl-k", type=int, default=16, help="icl: demonstrations in total, balanced over the classes")
    p.add_argument("--icl-max-length", type=int, default=None,
                   help="icl: token bound of a row (demonstrations + prompt + candidate; default: the model's context)")
    p.add_argument("--budgets-min", type=float, nargs="+", default=[5.0, 15.0])
    p.add_argument("--step-seconds", type=float, default=None, help="quiet-machine seconds per step of this "
                   "method (--measure's step_s)")
    p.add_argument("--sec-per-fe", type=float, default=None, help="quiet-machine seconds per forward (--measure's "
                   "fwd_s), to report forward-equivalents")
    p.add_argument("--eval-every", type=float, default=90.0, help="quiet seconds between dev evaluations")
    p.add_argument("--patience", type=float, default=float("inf"), help="stop after this many quiet seconds "
                   "without a better dev evaluation")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--test-max", type=int, default=0, help="cap on reported-split examples (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="append the JSON lines here (else stdout)")
    a = p.parse_args(argv)
    if not a.measure:
        if len(a.method) != 1:
            p.error("training takes one --method per call")
        if a.method[0] not in ("zeroshot", "icl") and not (a.step_seconds and a.step_seconds > 0):
            p.error("--step-seconds (> 0) turns minutes into steps: take it from --measure on a quiet machine")
    return a


def main(argv=None) -> None:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    def append(row: dict) -> None:              # one line per row, flushed as it comes
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if a.measure:
        rows = measure(a)
    else:
        rows = run(a, emit=append)
        if method_untrained(a):                 # zeroshot / icl return their one row without a training loop
            for r in rows:
                append(r)
    for r in rows:
        if not a.measure:
            print(json.dumps({k: r[k] for k in ("method", "seed", "lr", "budget_min", "steps", "test")}))


if __name__ == "__main__":
    main()
