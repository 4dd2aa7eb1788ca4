"""Plot bench_forward.py's rows: measured vs ideal saving per sweep (one panel each) -> PNG."""
from __future__ import annotations

import csv
import sys


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [("prefix", "shared-prefix fraction"), ("cands", "candidates per example"),
              ("frozen", "first trainable layer")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (sweep, label) in zip(axes, sweeps):
        plain = {r["x"]: float(r["median_s"]) for r in rows if r["sweep"] == sweep and r["mode"] == "plain"}
        reuse = [r for r in rows if r["sweep"] == sweep and r["mode"] == "reuse"]
        xs = [float(r["x"]) for r in reuse]
        ax.plot(xs, [float(r["ideal_saving"]) for r in reuse], "k--", marker="o", label="ideal (work skipped)")
        ax.plot(xs, [1 - float(r["median_s"]) / plain[r["x"]] for r in reuse], "C0-", marker="s",
                label="measured (1 - t_reuse/t_plain)")
        ax.set_xlabel(label)
        ax.set_ylabel("MeZO step time saved")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Forward-engine reuse, SmolLM2-135M MeZO-LoRA step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plot(list(csv.DictReader(f)), sys.argv[2])
