"""Tables, plot and learning-rate choice from ``bench_quality.py``'s JSON lines.

    .venv/bin/python bench/quality_report.py bench/out/quality/runs.jsonl                 # markdown tables
    .venv/bin/python bench/quality_report.py RUNS --plot bench/quality_sst2.png
    .venv/bin/python bench/quality_report.py RUNS --choose mezo-lora --task sst2 --k 16   # prints the lr

The lr (and schedule) of a method is chosen on seed 0's k-shot dev split only: the best dev evaluation (accuracy,
then loss, as ``selection.is_better``) at the largest budget. The reported split is never read by the choice.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mezo_kernels.train.selection import is_better  # noqa: E402

BASELINE = dict(objective="ce", distribution="gaussian", n_directions=1, eps=None)


def load(path: str | Path) -> list[dict]:
    """The rows of ``path``; a run recorded twice (a phase started again after an interruption writes the budgets
    it had reached once more) counts once, its last record."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no runs recorded")
    return list({setting_of(r): r for r in rows}.values())


def setting_of(r: dict) -> tuple:
    """What makes a row its own measurement: the method as the tables name it, task, k, seed, lr, eps, objective,
    directions, dtype and budget."""
    return (method_of(r), task_of(r), r["k"], r["seed"], r.get("lr"), r.get("eps"), r.get("objective"),
            r.get("n_directions"), r.get("dtype"), r["budget_min"])


def task_of(r: dict) -> str:
    """The task and, where it is not the harness's default 64, the max length (``rte (len 128)``): rows that
    cut their prompts differently are different experiments."""
    ml = r.get("max_length", 64)
    return r["task"] if ml == 64 else f"{r['task']} (len {ml})"


def _cell(r: dict, method: str, task: str, k: int) -> bool:
    """``r`` is a main-comparison row of ``method`` (as :func:`family_of` names it) on ``task`` (as :func:`task_of`
    names it) at ``k``."""
    return (family_of(r), task_of(r), r["k"]) == (method, task, k) and is_main(r)


def is_main(r: dict) -> bool:
    """Rows of the main comparison (CE, Gaussian or low-rank directions -- ``method_of`` keeps those apart --, one
    direction; the method's default eps)."""
    eps_default = 1e-3 if r["method"] == "mezo-full" else 1e-2
    return (r["objective"] == "ce" and r["distribution"] in ("gaussian", "lowrank") and r["n_directions"] == 1
            and (not r["method"].startswith("mezo") or r["eps"] == eps_default))


def schedule_of(r: dict) -> str:
    """The row's lr schedule (rows from before ``--schedule`` ran a constant lr)."""
    return r.get("schedule", "constant")


def choose_setting(rows: list[dict], method: str, task: str, k: int) -> tuple[float, str]:
    """The (lr, schedule) whose seed-0 run has the best dev evaluation at the largest budget any of them reached
    (a setting that stopped short of it is not compared)."""
    cand = [r for r in rows if _cell(r, method, task, k) and r["seed"] == 0]
    if not cand:
        raise ValueError(f"no seed-0 runs of {method} on {task} k={k} to choose from")
    top = max(r["budget_min"] for r in cand)
    last = {(r["lr"], schedule_of(r)): r for r in cand if r["budget_min"] == top}
    best = None
    for key in sorted(last):
        if best is None or is_better(last[key]["dev"], last[best]["dev"]):
            best = key
    return best


def choose(rows: list[dict], method: str, task: str, k: int) -> float:
    """The lr of :func:`choose_setting`."""
    return choose_setting(rows, method, task, k)[0]


def seeded_setting(rows: list[dict], method: str, task: str, k: int) -> tuple[float, str] | None:
    """The (lr, schedule) a method was taken to seeds 1, 2, ... with (the most seeds), or None when none ran on
    two seeds."""
    seeds: dict[tuple[float, str], set] = defaultdict(set)
    for r in rows:
        if _cell(r, method, task, k):
            seeds[(r["lr"], schedule_of(r))].add(r["seed"])
    best = max(seeds, key=lambda s: (len(seeds[s]), -s[0])) if seeds else None
    return best if best is not None and len(seeds[best]) > 1 else None


def seeded_lr(rows: list[dict], method: str, task: str, k: int) -> float | None:
    """The lr of :func:`seeded_setting`."""
    best = seeded_setting(rows, method, task, k)
    return None if best is None else best[0]


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


# methods without training (no lr, no budget): one row at budget 0, quoted at every budget
UNTRAINED = ("zeroshot", "icl")


def family_of(r: dict) -> str:
    """The method a choice is made within: ICL rows apart by their number of demonstrations, low-rank rows by their
    rank (``mezo-full lowrank r=1``); the lr schedule is part of the choice, not of the family."""
    if r["method"] == "icl" and "icl" in r:
        return f"icl K={r['icl']['k']}"
    if r.get("distribution") == "lowrank":
        return f"{r['method']} lowrank r={r.get('lowrank_r', 1)}"
    return r["method"]


def method_of(r: dict) -> str:
    """The row's method as the tables name it: its family, and a non-constant lr schedule."""
    return family_of(r) if schedule_of(r) == "constant" else f"{family_of(r)} ({schedule_of(r)})"


def main_table(rows: list[dict]) -> str:
    """Accuracy on the reported split (mean ± std over seeds) per (task, k, method, lr) and budget."""
    cells: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if is_main(r):
            cells[(task_of(r), r["k"], method_of(r), r["lr"] if r["method"] not in UNTRAINED else None)][
                r["budget_min"]].append(r)
    budgets = sorted({b for c in cells.values() for b in c if b > 0})
    head = "| task | k | method | lr | " + " | ".join(f"{b:g} min: acc % (steps, FE)" for b in budgets) + " | seeds |"
    out = [head, "|" + "---|" * (5 + len(budgets))]
    for key in sorted(cells, key=lambda t: (t[0], t[1], t[2], t[3] or 0)):
        task, k, method, lr = key
        by_b = cells[key]
        if lr is None:                            # an untrained method: its budget-0 row at every budget
            rs = by_b[0]
            vals = [_ms([r["test"]["accuracy"] for r in rs])] * len(budgets)
            seeds = len({r["seed"] for r in rs})
        else:
            vals = []
            for b in budgets:
                rs = by_b.get(b, [])
                if not rs:
                    vals.append("–")
                    continue
                steps = statistics.median(r["steps"] for r in rs)
                fe = statistics.median(r["fe"] for r in rs) if rs[0].get("fe") is not None else None
                stop = " stopped early" if any(r.get("stopped") == "patience" for r in rs) else ""
                vals.append(f"{_ms([r['test']['accuracy'] for r in rs])} ({steps:g}"
                            f"{f', {fe:.0f}' if fe is not None else ''}{stop})")
            seeds = len({r["seed"] for rs in by_b.values() for r in rs})
        out.append(f"| {task} | {k} | {method} | {lr if lr is not None else ''} | " + " | ".join(vals)
                   + f" | {seeds} |")
    return "\n".join(out)


def ablation_table(rows: list[dict], steps: int, lr: float | None = None, task: str = "sst2", k: int = 16) -> str:
    """MeZO-LoRA variants at equal steps and seed: seed-0 rows of ``task`` at ``k`` that ran ``steps`` steps at
    ``lr``."""
    sel = [r for r in rows if r["method"] == "mezo-lora" and r["seed"] == 0 and r["steps"] == steps
           and task_of(r) == task and r["k"] == k and (lr is None or r["lr"] == lr)]
    if not sel:
        raise ValueError(f"no seed-0 mezo-lora rows of {task} with {steps} steps" + (f" at lr {lr:g}" if lr else ""))
    out = ["| variant | lr | eps | steps | test acc % | dev acc % | zero-gradient rate |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(sel, key=lambda r: (r["objective"], r["distribution"], r["n_directions"], r["eps"], r["lr"])):
        name = f"{r['objective']}, {r['distribution']}, n={r['n_directions']}"
        out.append(f"| {name} | {r['lr']:g} | {r['eps']:g} | {r['steps']} | {100 * r['test']['accuracy']:.1f} | "
                   f"{100 * r['dev']['accuracy']:.1f} | {100 * (r.get('zero_grad_rate') or 0):.1f} % |")
    return "\n".join(out)


def plot(rows: list[dict], path: str, k: int = 16, tasks: list[str] | None = None) -> list[str]:
    """Reported-split accuracy against the quiet-machine budget: one panel per task, one line per method at the
    lr it was taken to seeds with, else the lr the dev split chose. Returns the tasks drawn, one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    have = sorted({task_of(r) for r in rows if r["k"] == k and r["method"] not in UNTRAINED})
    tasks = [t for t in tasks if t in have] if tasks else have
    if not tasks:
        raise ValueError(f"no trained runs with k={k} to plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        trained = sorted({family_of(r) for r in rows
                          if r["method"] not in UNTRAINED and task_of(r) == task and r["k"] == k and is_main(r)})
        for method in trained:
            setting = seeded_setting(rows, method, task, k)
            if setting is None:                             # a one-seed grid: the dev split's choice
                if not any(_cell(r, method, task, k) for r in rows):
                    continue
                setting = choose_setting(rows, method, task, k)
            lr, schedule = setting
            pts = defaultdict(list)
            for r in rows:
                if _cell(r, method, task, k) and (r["lr"], schedule_of(r)) == setting:
                    pts[r["budget_min"]].append(100 * r["test"]["accuracy"])
            xs = sorted(pts)
            n = sorted({len(v) for v in pts.values()})
            ax.errorbar(xs, [statistics.mean(pts[x]) for x in xs],
                        yerr=[statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0 for x in xs], marker="o",
                        capsize=3, label=f"{method} (lr {lr:g}{'' if schedule == 'constant' else ', ' + schedule}, "
                                        f"{'-'.join(map(str, n))} seeds)")
        flat: dict[str, list[float]] = defaultdict(list)    # untrained rows: a level line each (mean over seeds)
        for r in rows:
            if r["method"] in UNTRAINED and task_of(r) == task:
                flat["zero-shot" if r["method"] == "zeroshot" else family_of(r)].append(100 * r["test"]["accuracy"])
        for i, (name, accs) in enumerate(sorted(flat.items(), key=lambda kv: kv[0] != "zero-shot")):
            ax.axhline(statistics.mean(accs), color=("gray", "tab:olive", "tab:cyan", "tab:pink")[i % 4],
                       ls=("--", ":", "-.", ":")[i % 4], label=f"{name} ({len(accs)} seeds)" if i else name)
        if max((r["budget_min"] for r in rows if task_of(r) == task), default=0) > 20:
            ax.set_xscale("log")
            ticks = sorted({r["budget_min"] for r in rows
                            if task_of(r) == task and r["budget_min"] > 0 and is_main(r)})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("budget (minutes of the quiet 2-core CPU, training only)")
        ax.set_ylabel(f"{task} reported-split accuracy (%)")
        ax.set_title(f"SmolLM2-135M, {task} k={k}: weights chosen on the dev split", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return tasks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs")
    p.add_argument("--choose", default=None, help="print the dev-chosen lr of this method")
    p.add_argument("--task", default="sst2")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--plot", default=None)
    p.add_argument("--plot-tasks", nargs="*", default=None, help="panels to draw (default: every task at --k)")
    p.add_argument("--ablation-steps", type=int, nargs="*", default=[], help="one ablation table per step count")
    p.add_argument("--ablation-lr", type=float, default=None)
    a = p.parse_args(argv)
    rows = load(a.runs)
    if a.choose:                                    # "LR", or "LR SCHEDULE" for a non-constant schedule
        lr, schedule = choose_setting(rows, a.choose, a.task, a.k)
        print(f"{lr:g}" + ("" if schedule == "constant" else f" {schedule}"))
        return
    print(main_table(rows))
    for steps in a.ablation_steps:
        print()
        print(ablation_table(rows, steps, a.ablation_lr, a.task, a.k))
    if a.plot:
        plot(rows, a.plot, a.k, a.plot_tasks)


if __name__ == "__main__":
    main()
