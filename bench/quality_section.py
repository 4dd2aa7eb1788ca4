"""One quality study's section of bench/RESULTS.md from its runs file: the dev-split choices, the accuracy table,
the gap between two methods per budget, and the plot.

    .venv/bin/python bench/quality_section.py bench/quality_runs/quality-stage1.jsonl --section quality-60min-sst2 \\
        --compare mezo-lora bp-lora --plot bench/quality_60min.png

Everything between the section's markers is computed from the runs; the hand-written account (commands, machine,
date, budgets, the reading) stays outside them, or comes from ``--intro FILE``. The choice table shows only the
k-shot dev split, which is all a choice reads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_report as qr  # noqa: E402
from results import replace_section  # noqa: E402


def choice_table(rows: list[dict], task: str, k: int) -> str:
    """Every seed-0 setting of every trained family at the largest budget its family reached: the dev evaluation
    the choice compares (accuracy, then loss), the step it came from, and which setting was chosen."""
    fams = sorted({qr.family_of(r) for r in rows if qr._cell(r, qr.family_of(r), task, k)
                   and r["method"] not in qr.UNTRAINED and r["seed"] == 0})
    out = ["| method | lr | schedule | budget (min) | dev acc % (n) | dev loss | at step | chosen |",
           "|---|---|---|---|---|---|---|---|"]
    for fam in fams:
        cand = [r for r in rows if qr._cell(r, fam, task, k) and r["seed"] == 0]
        top = max(r["budget_min"] for r in cand)
        pick = qr.choose_setting(rows, fam, task, k)
        for r in sorted((r for r in cand if r["budget_min"] == top), key=lambda r: (qr.schedule_of(r), r["lr"])):
            dev = r["dev"]
            mark = "**yes**" if (r["lr"], qr.schedule_of(r)) == pick else ""
            out.append(f"| {fam} | {r['lr']:g} | {qr.schedule_of(r)} | {top:g} | {100 * dev['accuracy']:.1f} "
                       f"({dev.get('n', '')}) | {dev['loss']:.3f} | {r.get('best_step', '')} | {mark} |")
    return "\n".join(out)


def setting_for(rows: list[dict], fam: str, task: str, k: int) -> tuple[float, str]:
    """The setting a family is reported at: the one taken to the most seeds, else the dev choice."""
    return qr.seeded_setting(rows, fam, task, k) or qr.choose_setting(rows, fam, task, k)


def gap_table(rows: list[dict], a: str, b: str, task: str, k: int) -> str:
    """Per budget: ``a`` and ``b`` at their reported settings (mean ± std over seeds, the seeds' count) and
    ``b - a`` in points (means)."""
    accs: dict[str, dict[float, list[float]]] = {}
    for fam in (a, b):
        accs[fam] = defaultdict(list)
        if not any(qr._cell(r, fam, task, k) for r in rows):     # not run yet: its column stays empty
            continue
        setting = setting_for(rows, fam, task, k)
        for r in rows:
            if qr._cell(r, fam, task, k) and (r["lr"], qr.schedule_of(r)) == setting:
                accs[fam][r["budget_min"]].append(r["test"]["accuracy"])
    out = [f"| budget (min) | {a} acc % (seeds) | {b} acc % (seeds) | {b} − {a} (points) |", "|---|---|---|---|"]
    for m in sorted(set(accs[a]) | set(accs[b])):
        xa, xb = accs[a].get(m, []), accs[b].get(m, [])
        gap = f"{100 * (statistics.mean(xb) - statistics.mean(xa)):+.1f}" if xa and xb else "–"
        cell = lambda xs: f"{qr._ms(xs)} ({len(xs)})" if xs else "–"   # noqa: E731
        out.append(f"| {m:g} | {cell(xa)} | {cell(xb)} | {gap} |")
    return "\n".join(out)


def section(rows: list[dict], intro: str, task: str, k: int, compare: list[str] | None,
            plot_rel: str | None) -> str:
    parts = ([intro.rstrip(), ""] if intro.strip() else []) + ["Dev-split choices (seed 0; the reported split is never read by a choice):", "",
             choice_table(rows, task, k), "", "Accuracy on the reported split of the dev-selected weights "
             "(mean ± std over seeds; in brackets the median steps and forward-equivalents):", "",
             qr.main_table(rows)]
    if compare:
        parts += ["", f"{compare[1]} against {compare[0]} at each budget, each at its reported setting:", "",
                  gap_table(rows, compare[0], compare[1], task, k)]
    if plot_rel:
        parts += ["", f"![{task} quality]({plot_rel})"]
    return "\n".join(parts) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs")
    p.add_argument("--section", required=True, help="the RESULTS.md section key to (re)write")
    p.add_argument("--intro", default=None, help="Markdown file that opens the generated part")
    p.add_argument("--task", default="sst2", help="the task as the tables name it, e.g. 'rte (len 128)'")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"), help="two families for the gap table")
    p.add_argument("--plot", default=None, help="PNG to draw (next to RESULTS.md)")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    a = p.parse_args(argv)
    rows = qr.load(a.runs)
    rel = None
    if a.plot:
        qr.plot(rows, a.plot, a.k, [a.task])
        rel = os.path.relpath(a.plot, os.path.dirname(os.path.abspath(a.results)))
    body = section(rows, Path(a.intro).read_text() if a.intro else "", a.task, a.k, a.compare, rel)
    replace_section(a.results, a.section, body)
    print(body)


if __name__ == "__main__":
    main()
