"""Plots of the step benchmark: median step time and peak memory (footprint) per method, one group of bars per
configuration; error bars on the times span min..max over the timed steps. Log y axes: the methods and models span
orders of magnitude. Configurations that were skipped or failed have no bar.

Usage:  python bench/plot_step.py bench/out/step_cpu.csv [--out-dir bench]
Writes step_time_<device>.png and step_memory_<device>.png (bench_step.py calls :func:`plot` itself).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_report import canonical  # noqa: E402

METHOD_ORDER = ("inference", "mezo-inplace-master", "mezo-inplace-nomaster", "mezo-virtual", "mezo-batched",
                "mezo-n4", "mezo-batched-n4", "reference", "backprop", "backprop-ckpt")


def _label(r: dict) -> str:
    return f"{r['model']}\n{r['mode']} {r['dtype']}\n{r['batch']}x{r['seq']}"


def plot(rows: list[dict], device: str, out_dir: str) -> list[str]:
    """Write the two PNGs for ``rows`` (CSV dicts) into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [{**r, "method": canonical(r["method"])} for r in rows if r.get("status") == "ok"]   # old CSVs too
    configs = list(dict.fromkeys(_label(r) for r in rows))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in ok)]
    by = {(_label(r), r["method"]): r for r in ok}
    width = 0.8 / max(1, len(methods))
    paths = []
    for kind, ylabel in (("time", "median step time (ms), min..max"), ("memory", "peak footprint (MiB)")):
        fig, ax = plt.subplots(figsize=(min(16, max(7, 2 + 1.3 * len(configs))), 4.5), dpi=100)
        for j, m in enumerate(methods):
            xs, ys, lo, hi = [], [], [], []
            for i, c in enumerate(configs):
                r = by.get((c, m))
                if r is None:
                    continue
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                if kind == "time":
                    y = float(r["median_ms"])
                    ys.append(y); lo.append(y - float(r["min_ms"])); hi.append(float(r["max_ms"]) - y)
                else:
                    ys.append(float(r["footprint_mib"]))
            err = [lo, hi] if kind == "time" else None
            ax.bar(xs, ys, width, label=m, yerr=err, capsize=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(configs)), configs, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"MeZO vs backprop vs inference, {device}: "
                     + ("step time" if kind == "time" else "weights + peak over baseline"), fontsize=10,
                     pad=10 + 16 * -(-len(methods) // 5))          # room for the legend's rows above the axes
        if methods:
            ax.legend(fontsize=7, ncol=min(5, len(methods)), loc="lower left", bbox_to_anchor=(0, 1.07),
                      frameon=False)
        ax.grid(axis="y", alpha=0.3, which="both")
        fig.tight_layout()
        path = os.path.join(out_dir, f"step_{kind}_{device}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="bench/out/step_<device>.csv from bench_step.py")
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args(argv)
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{args.csv} has no rows")
    print("\n".join(plot(rows, rows[0]["device"], args.out_dir)))


if __name__ == "__main__":
    main()
